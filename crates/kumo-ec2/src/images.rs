//! Image actions over the controller's image operations.

use kumo_controller::OpError;
use kumo_store::{ImageRow, StoreError};
use kumo_types::api::ImportImage;
use kumo_types::id::{is_id, IdKind};

use crate::error::{not_found, Ec2Error};
use crate::filter::{check_names, matches_all, tag_values};
use crate::params::{check_tag, Params};
use crate::render::{tag_set, ROOT_DEVICE};
use crate::xml::{ts, Xml};
use crate::{page, Ctx};

const IMAGE_FILTERS: &[&str] = &[
    "image-id",
    "name",
    "state",
    "owner-id",
    "is-public",
    "architecture",
    "image-type",
    "kernel-id",
    "ramdisk-id",
    "root-device-type",
    "root-device-name",
    "virtualization-type",
    "hypervisor",
];

fn is_image_id(s: &str) -> bool {
    is_id(IdKind::Image, s) || is_id(IdKind::Kernel, s) || is_id(IdKind::Ramdisk, s)
}

fn image_type(kind: &str) -> &'static str {
    match kind {
        "kernel" => "kernel",
        "ramdisk" => "ramdisk",
        _ => "machine",
    }
}

fn image_values(i: &ImageRow, tags: &[(String, String)], name: &str) -> Vec<String> {
    if let Some(v) = tag_values(name, tags) {
        return v;
    }
    let one = |s: &str| vec![s.to_string()];
    match name {
        "image-id" => one(&i.id),
        "name" => one(&i.name),
        "state" => one(&i.state),
        "owner-id" => one(&i.project_id),
        "is-public" => one(if i.public { "true" } else { "false" }),
        "architecture" => one("x86_64"),
        "image-type" => one(image_type(&i.kind)),
        "kernel-id" => i.kernel_id.clone().into_iter().collect(),
        "ramdisk-id" => i.ramdisk_id.clone().into_iter().collect(),
        "root-device-type" => one("ebs"),
        "root-device-name" => one(ROOT_DEVICE),
        "virtualization-type" => one("hvm"),
        "hypervisor" => one("kvm"),
        _ => vec![],
    }
}

fn check_image_ids(ids: &[String]) -> Result<(), Ec2Error> {
    match ids.iter().find(|id| !is_image_id(id)) {
        Some(bad) => Err(Ec2Error::AmiMalformed(format!(
            "Invalid id: \"{bad}\" (expecting \"ami-...\")"
        ))),
        None => Ok(()),
    }
}

fn write_image(x: &mut Xml, i: &ImageRow, tags: &[(String, String)]) {
    x.leaf("imageId", &i.id);
    x.leaf("imageLocation", &format!("{}/{}", i.project_id, i.name));
    x.leaf("imageState", &i.state);
    x.leaf("imageOwnerId", &i.project_id);
    x.leaf("creationDate", &ts(i.created_at));
    x.bool("isPublic", i.public);
    x.leaf("architecture", "x86_64");
    x.leaf("imageType", image_type(&i.kind));
    x.opt("kernelId", i.kernel_id.as_deref());
    x.opt("ramdiskId", i.ramdisk_id.as_deref());
    x.leaf("name", &i.name);
    x.leaf("rootDeviceType", "ebs");
    x.leaf("rootDeviceName", ROOT_DEVICE);
    match (i.kind.as_str(), i.virtual_size) {
        ("disk", Some(size)) => x.elem("blockDeviceMapping", |x| {
            x.elem("item", |x| {
                x.leaf("deviceName", ROOT_DEVICE);
                x.elem("ebs", |x| {
                    x.num("volumeSize", size.div_ceil(1 << 30));
                    x.bool("deleteOnTermination", true);
                    x.leaf("volumeType", "standard");
                });
            })
        }),
        _ => x.empty("blockDeviceMapping"),
    }
    x.leaf("virtualizationType", "hvm");
    tag_set(x, tags);
    x.leaf("hypervisor", "kvm");
    x.leaf("platformDetails", "Linux/UNIX");
    x.leaf("usageOperation", "RunInstances");
    x.bool("enaSupport", false);
}

pub async fn describe(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let ids = p.list("ImageId")?;
    let owners = p.list("Owner")?;
    let _executable_by = p.list("ExecutableBy")?;
    let filters = p.filters()?;
    let max = p.int_in("MaxResults", 1, 1000)?;
    let token = p.string("NextToken");
    let _ = p.bool("IncludeDeprecated")?;
    let _ = p.bool("IncludeDisabled")?;
    let dry = p.dry_run()?;
    p.finish()?;
    check_image_ids(&ids)?;
    if max.is_some() && !ids.is_empty() {
        return Err(Ec2Error::InvalidParameterCombination(
            "The parameter ImageIds cannot be used with the parameter maxResults".into(),
        ));
    }
    check_names(&filters, IMAGE_FILTERS, true)?;
    if dry {
        return Err(ctx.dry_run("DescribeImages"));
    }
    let mut rows: Vec<ImageRow> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let (items, next) = ctx
            .ctl
            .store
            .images(&ctx.scope, Some(1000), cursor.as_deref(), None)
            .await?;
        rows.extend(items);
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    if !ids.is_empty() {
        let missing: Vec<&String> = ids
            .iter()
            .filter(|id| !rows.iter().any(|r| &r.id == *id))
            .collect();
        if let Some(m) = missing.first() {
            return Err(if missing.len() == 1 {
                not_found("image", m)
            } else {
                Ec2Error::AmiNotFound(format!(
                    "The image ids '[{}]' do not exist",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            });
        }
        rows.retain(|r| ids.contains(&r.id));
    }
    if !owners.is_empty() {
        let me = ctx.scope.project_id.clone();
        rows.retain(|r| {
            owners.iter().any(|o| match o.as_str() {
                "self" => r.project_id == me,
                "amazon" | "aws-marketplace" | "kumo" => r.public,
                other => r.project_id == other,
            })
        });
    }
    let mut all_tags: std::collections::HashMap<String, Vec<(String, String)>> = Default::default();
    for t in ctx.ctl.store.tags(&ctx.scope, ctx.cutoff()).await? {
        all_tags
            .entry(t.resource_id)
            .or_default()
            .push((t.key, t.value));
    }
    let none: Vec<(String, String)> = Vec::new();
    let tags_of = |id: &str| all_tags.get(id).unwrap_or(&none);
    rows.retain(|i| matches_all(&filters, |n| image_values(i, tags_of(&i.id), n)));
    let (rows, next) = page::page(rows, |r| r.id.clone(), token.as_deref(), max)?;
    let mut x = Xml::new();
    x.response("DescribeImages", &ctx.request_id, |x| {
        x.set("imagesSet", &rows, |x, i| write_image(x, i, tags_of(&i.id)));
        x.opt("nextToken", next.as_deref());
    });
    Ok(x.finish())
}

pub async fn register(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let name = p.required("Name")?;
    let location = p.string("ImageLocation");
    let kernel = p.string("KernelId");
    let ramdisk = p.string("RamdiskId");
    if let Some(a) = p.string("Architecture") {
        if a != "x86_64" {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "Invalid value '{a}' for Architecture: kumo runs x86_64 images"
            )));
        }
    }
    if let Some(v) = p.string("VirtualizationType") {
        if v != "hvm" && v != "paravirtual" {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "Invalid value '{v}' for VirtualizationType"
            )));
        }
    }
    let _ = p.string("RootDeviceName");
    let _ = p.string("Description");
    let specs = p.tag_specs()?;
    for n in [
        "BlockDeviceMapping",
        "BillingProduct",
        "UefiData",
        "TpmSupport",
        "BootMode",
        "ImdsSupport",
        "SriovNetSupport",
        "EnaSupport",
    ] {
        if p.take_prefix(n) {
            return Err(Ec2Error::UnsupportedOperation(format!(
                "The parameter {n} is not supported by kumo yet"
            )));
        }
    }
    let dry = p.dry_run()?;
    p.finish()?;
    let location = location.ok_or_else(|| {
        Ec2Error::MissingParameter(
            "The request must contain the parameter ImageLocation: kumo registers an image from a disk image file the controller can read (an absolute path)".into(),
        )
    })?;
    if let Some(k) = &kernel {
        if !is_id(IdKind::Kernel, k) {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "Invalid id: \"{k}\" (expecting \"aki-...\")"
            )));
        }
    }
    if let Some(r) = &ramdisk {
        if !is_id(IdKind::Ramdisk, r) {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "Invalid id: \"{r}\" (expecting \"ari-...\")"
            )));
        }
    }
    let mut tags = Vec::new();
    for s in &specs {
        if s.resource_type != "image" {
            return Err(Ec2Error::UnsupportedOperation(format!(
                "RegisterImage tags only the image, not {:?} resources",
                s.resource_type
            )));
        }
        for (k, v) in &s.tags {
            check_tag(k, v)?;
            tags.push((k.clone(), v.clone()));
        }
    }
    if dry {
        return Err(ctx.dry_run("RegisterImage"));
    }
    let req = ImportImage {
        name: name.clone(),
        kind: Some("disk".into()),
        path: location,
        format: None,
        kernel_id: kernel,
        ramdisk_id: ramdisk,
        cmdline: None,
        public: false,
    };
    let (img, _op) = ctx
        .ctl
        .import_image(&ctx.scope, &req)
        .await
        .map_err(|e| match e {
            OpError::Conflict(m) => Ec2Error::AmiNameDuplicate(m),
            other => Ec2Error::from_op(other),
        })?;
    if !tags.is_empty() {
        ctx.ctl
            .store
            .put_tags(&img.project_id, &[(img.id.clone(), "image".into())], &tags)
            .await?;
    }
    let mut x = Xml::new();
    x.response("RegisterImage", &ctx.request_id, |x| {
        x.leaf("imageId", &img.id)
    });
    Ok(x.finish())
}

pub async fn deregister(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let id = p.required("ImageId")?;
    let _ = p.bool("DeleteAssociatedSnapshots")?;
    let dry = p.dry_run()?;
    p.finish()?;
    check_image_ids(std::slice::from_ref(&id))?;
    let img = owned_image(ctx, &id).await?;
    if dry {
        return Err(ctx.dry_run("DeregisterImage"));
    }
    ctx.ctl
        .delete_image(&ctx.scope, &img.id)
        .await
        .map_err(|e| match e {
            OpError::Conflict(m) => Ec2Error::DependencyViolation(m),
            other => Ec2Error::from_op(other),
        })?;
    let mut x = Xml::new();
    x.response("DeregisterImage", &ctx.request_id, |x| {
        x.bool("return", true)
    });
    Ok(x.finish())
}

/// An image the caller owns (admins: any). A public image of another project is visible, so
/// changing it is UnauthorizedOperation; any other image of another project is NotFound.
pub(crate) async fn owned_image(ctx: &Ctx<'_>, id: &str) -> Result<ImageRow, Ec2Error> {
    match ctx.ctl.store.image(&ctx.scope, id).await {
        Ok(img) if img.id == id && (ctx.scope.admin || img.project_id == ctx.scope.project_id) => {
            Ok(img)
        }
        Ok(img) if img.id == id && img.public => Err(Ec2Error::UnauthorizedOperation(format!(
            "You are not authorized to perform this operation: image {id} belongs to another project."
        ))),
        Ok(_) | Err(StoreError::NotFound { .. }) => Err(not_found("image", id)),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn is_image(id: &str) -> bool {
    is_image_id(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_snapshot() {
        let img = ImageRow {
            id: "ami-0123456789abcdef0".into(),
            project_id: "proj-1".into(),
            name: "demo".into(),
            kind: "disk".into(),
            state: "available".into(),
            public: true,
            source_format: Some("qcow2".into()),
            virtual_size: Some(3 << 30),
            file_size: Some(1 << 20),
            sha256: None,
            path: "/var/lib/kumo/images/ami-0123456789abcdef0".into(),
            kernel_id: Some("aki-0123456789abcdef0".into()),
            ramdisk_id: None,
            cmdline: None,
            error: None,
            created_at: chrono::DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
                .map(|t| t.with_timezone(&chrono::Utc))
                .unwrap_or_default(),
        };
        let mut x = Xml::new();
        x.response("DescribeImages", "req-1", |x| {
            x.set("imagesSet", &[img], |x, i| write_image(x, i, &[]));
        });
        assert_eq!(
            x.finish(),
            concat!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>",
                "<DescribeImagesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>req-1</requestId>",
                "<imagesSet><item><imageId>ami-0123456789abcdef0</imageId><imageLocation>proj-1/demo</imageLocation>",
                "<imageState>available</imageState><imageOwnerId>proj-1</imageOwnerId>",
                "<creationDate>2024-01-01T00:00:00.000Z</creationDate><isPublic>true</isPublic>",
                "<architecture>x86_64</architecture><imageType>machine</imageType><kernelId>aki-0123456789abcdef0</kernelId>",
                "<name>demo</name><rootDeviceType>ebs</rootDeviceType><rootDeviceName>/dev/vda</rootDeviceName>",
                "<blockDeviceMapping><item><deviceName>/dev/vda</deviceName><ebs><volumeSize>3</volumeSize>",
                "<deleteOnTermination>true</deleteOnTermination><volumeType>standard</volumeType></ebs></item></blockDeviceMapping>",
                "<virtualizationType>hvm</virtualizationType><tagSet/><hypervisor>kvm</hypervisor>",
                "<platformDetails>Linux/UNIX</platformDetails><usageOperation>RunInstances</usageOperation>",
                "<enaSupport>false</enaSupport></item></imagesSet></DescribeImagesResponse>"
            )
        );
    }
}
