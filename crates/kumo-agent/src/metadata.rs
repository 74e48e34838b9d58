//! The metadata service (EC2 IMDSv1/v2 and NoCloud) served to VMs.
