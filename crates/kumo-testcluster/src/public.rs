//! The public network of a test cluster and the "outside" namespace that stands for the Internet on it.

use std::process::{Command, Output, Stdio};

use crate::{
    netns_name, public_bridge_name, sys, Cluster, ClusterError, HOST_PUBLIC_BRIDGE, OUTSIDE_IP,
};

impl Cluster {
    /// The "public" network: a bridge in the root namespace (no address: the machine itself stays out)
    /// joining a `pub0` bridge in every host (the agents' `--public-bridge`) and the outside namespace,
    /// which plays the Internet at [`OUTSIDE_IP`] on [`PUBLIC_CIDR`].
    pub(crate) fn build_public_network(&mut self) -> Result<(), ClusterError> {
        let id = self.id;
        let pb = public_bridge_name(id);
        sys::ip(&["link", "add", &pb, "type", "bridge"])?;
        sys::ip(&["link", "set", &pb, "up"])?;
        for (i, h) in self.hosts.clone().iter().enumerate() {
            let veth = self.public_veth(i);
            sys::ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "pubv", "netns", &h.netns,
            ])?;
            sys::ip(&["link", "set", &veth, "master", &pb, "up"])?;
            sys::ip(&[
                "-n",
                &h.netns,
                "link",
                "add",
                HOST_PUBLIC_BRIDGE,
                "type",
                "bridge",
            ])?;
            sys::ip(&[
                "-n",
                &h.netns,
                "link",
                "set",
                "pubv",
                "master",
                HOST_PUBLIC_BRIDGE,
                "up",
            ])?;
            sys::ip(&["-n", &h.netns, "link", "set", HOST_PUBLIC_BRIDGE, "up"])?;
        }
        let outside = self.outside_netns();
        sys::ip(&["netns", "add", &outside])?;
        let veth = format!("kcv{id}o");
        sys::ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &outside,
        ])?;
        sys::ip(&["link", "set", &veth, "master", &pb, "up"])?;
        sys::ip(&[
            "-n",
            &outside,
            "addr",
            "add",
            &format!("{OUTSIDE_IP}/24"),
            "dev",
            "eth0",
        ])?;
        sys::ip(&["-n", &outside, "link", "set", "eth0", "up"])?;
        sys::ip(&["-n", &outside, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Cut host `i` off the public network (its VMs' side; management stays): the root end
    /// of its public veth goes down, as when a cable is pulled.
    pub fn cut_public(&self, i: usize) -> Result<(), ClusterError> {
        sys::ip(&["link", "set", &self.public_veth(i), "down"])
    }

    pub fn restore_public(&self, i: usize) -> Result<(), ClusterError> {
        sys::ip(&["link", "set", &self.public_veth(i), "up"])
    }

    /// The root-namespace end of host `i`'s public veth.
    fn public_veth(&self, i: usize) -> String {
        format!("kcv{}p{i}", self.id)
    }

    /// The namespace standing for the outside world on the public network.
    pub fn outside_netns(&self) -> String {
        netns_name(self.id, "outside")
    }

    /// Runs a command in the outside namespace.
    pub fn exec_outside(&self, args: &[&str]) -> Output {
        Command::new(sys::ip_bin())
            .args(["netns", "exec", &self.outside_netns()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(sys::failed_output)
    }

    /// Host `i`'s router namespace for a network (see `kumo agent --router-netns-prefix`).
    pub fn router_netns(&self, i: usize, network_id: &str) -> String {
        let tail: String = network_id
            .chars()
            .rev()
            .take(12)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("{}-r-{tail}", self.hosts[i].netns)
    }
}
