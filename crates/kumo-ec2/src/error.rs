//! EC2 error codes with EC2's HTTP statuses, and the error document botocore parses:
//! `<Response><Errors><Error><Code/><Message/></Error></Errors><RequestID/></Response>`.

use axum::http::StatusCode;
use kumo_controller::OpError;
use kumo_store::StoreError;

use crate::xml::Xml;

#[derive(Debug, thiserror::Error)]
pub enum Ec2Error {
    #[error("{0}")]
    AuthFailure(String),
    #[error("{0}")]
    RequestExpired(String),
    #[error("{0}")]
    UnauthorizedOperation(String),
    #[error("{0}")]
    InvalidParameterValue(String),
    #[error("{0}")]
    InvalidParameterCombination(String),
    #[error("{0}")]
    MissingParameter(String),
    #[error("{0}")]
    UnknownParameter(String),
    #[error("{0}")]
    InstanceNotFound(String),
    #[error("{0}")]
    InstanceMalformed(String),
    #[error("{0}")]
    AmiNotFound(String),
    #[error("{0}")]
    AmiMalformed(String),
    #[error("{0}")]
    AmiNameDuplicate(String),
    #[error("{0}")]
    InvalidId(String),
    #[error("{0}")]
    InvalidInstanceType(String),
    #[error("{0}")]
    IncorrectInstanceState(String),
    #[error("{0}")]
    DependencyViolation(String),
    #[error("{0}")]
    IdempotentParameterMismatch(String),
    #[error("Request would have succeeded, but DryRun flag is set.")]
    DryRunOperation,
    #[error("{0}")]
    InsufficientInstanceCapacity(String),
    #[error("{0}")]
    InstanceLimitExceeded(String),
    #[error("{0}")]
    InvalidAction(String),
    #[error("{0}")]
    PlacementGroupUnknown(String),
    #[error("{0}")]
    PlacementGroupDuplicate(String),
    #[error("{0}")]
    PlacementGroupInUse(String),
    #[error("{0}")]
    GroupNotFound(String),
    #[error("{0}")]
    GroupDuplicate(String),
    #[error("{0}")]
    GroupReserved(String),
    #[error("{0}")]
    GroupIdMalformed(String),
    #[error("{0}")]
    CannotDelete(String),
    #[error("{0}")]
    PermissionDuplicate(String),
    #[error("{0}")]
    PermissionNotFound(String),
    #[error("{0}")]
    RuleIdNotFound(String),
    #[error("{0}")]
    KeyPairNotFound(String),
    #[error("{0}")]
    KeyPairDuplicate(String),
    #[error("{0}")]
    KeyFormat(String),
    #[error("{0}")]
    UnsupportedOperation(String),
    #[error("{0}")]
    AllocationNotFound(String),
    #[error("{0}")]
    AssociationNotFound(String),
    #[error("{0}")]
    AddressNotFound(String),
    #[error("{0}")]
    AddressInUse(String),
    #[error("{0}")]
    AddressLimitExceeded(String),
    #[error("{0}")]
    ResourceAlreadyAssociated(String),
    #[error("{0}")]
    VpcNotFound(String),
    #[error("{0}")]
    VpcRange(String),
    #[error("{0}")]
    SubnetNotFound(String),
    #[error("{0}")]
    VolumeNotFound(String),
    #[error("{0}")]
    SnapshotNotFound(String),
    #[error("{0}")]
    VolumeInUse(String),
    #[error("{0}")]
    IncorrectState(String),
    #[error("{0}")]
    VolumeZoneMismatch(String),
    #[error("{0}")]
    SnapshotInUse(String),
    #[error("{0}")]
    InsufficientVolumeCapacity(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("An internal error has occurred")]
    Internal(String),
}

impl Ec2Error {
    pub fn code(&self) -> &'static str {
        use Ec2Error::*;
        match self {
            AuthFailure(_) => "AuthFailure",
            RequestExpired(_) => "RequestExpired",
            UnauthorizedOperation(_) => "UnauthorizedOperation",
            InvalidParameterValue(_) => "InvalidParameterValue",
            InvalidParameterCombination(_) => "InvalidParameterCombination",
            MissingParameter(_) => "MissingParameter",
            UnknownParameter(_) => "UnknownParameter",
            InstanceNotFound(_) => "InvalidInstanceID.NotFound",
            InstanceMalformed(_) => "InvalidInstanceID.Malformed",
            AmiNotFound(_) => "InvalidAMIID.NotFound",
            AmiMalformed(_) => "InvalidAMIID.Malformed",
            AmiNameDuplicate(_) => "InvalidAMIName.Duplicate",
            InvalidId(_) => "InvalidID",
            InvalidInstanceType(_) => "InvalidInstanceType",
            IncorrectInstanceState(_) => "IncorrectInstanceState",
            DependencyViolation(_) => "DependencyViolation",
            IdempotentParameterMismatch(_) => "IdempotentParameterMismatch",
            DryRunOperation => "DryRunOperation",
            InsufficientInstanceCapacity(_) => "InsufficientInstanceCapacity",
            InstanceLimitExceeded(_) => "InstanceLimitExceeded",
            InvalidAction(_) => "InvalidAction",
            PlacementGroupUnknown(_) => "InvalidPlacementGroup.Unknown",
            PlacementGroupDuplicate(_) => "InvalidPlacementGroup.Duplicate",
            PlacementGroupInUse(_) => "InvalidPlacementGroup.InUse",
            GroupNotFound(_) => "InvalidGroup.NotFound",
            GroupDuplicate(_) => "InvalidGroup.Duplicate",
            GroupReserved(_) => "InvalidGroup.Reserved",
            GroupIdMalformed(_) => "InvalidGroupId.Malformed",
            CannotDelete(_) => "CannotDelete",
            PermissionDuplicate(_) => "InvalidPermission.Duplicate",
            PermissionNotFound(_) => "InvalidPermission.NotFound",
            RuleIdNotFound(_) => "InvalidSecurityGroupRuleId.NotFound",
            KeyPairNotFound(_) => "InvalidKeyPair.NotFound",
            KeyPairDuplicate(_) => "InvalidKeyPair.Duplicate",
            KeyFormat(_) => "InvalidKey.Format",
            UnsupportedOperation(_) => "UnsupportedOperation",
            AllocationNotFound(_) => "InvalidAllocationID.NotFound",
            AssociationNotFound(_) => "InvalidAssociationID.NotFound",
            AddressNotFound(_) => "InvalidAddress.NotFound",
            AddressInUse(_) => "InvalidIPAddress.InUse",
            AddressLimitExceeded(_) => "AddressLimitExceeded",
            ResourceAlreadyAssociated(_) => "Resource.AlreadyAssociated",
            VpcNotFound(_) => "InvalidVpcID.NotFound",
            VpcRange(_) => "InvalidVpc.Range",
            SubnetNotFound(_) => "InvalidSubnetID.NotFound",
            VolumeNotFound(_) => "InvalidVolume.NotFound",
            SnapshotNotFound(_) => "InvalidSnapshot.NotFound",
            VolumeInUse(_) => "VolumeInUse",
            IncorrectState(_) => "IncorrectState",
            VolumeZoneMismatch(_) => "InvalidVolume.ZoneMismatch",
            SnapshotInUse(_) => "InvalidSnapshot.InUse",
            InsufficientVolumeCapacity(_) => "InsufficientVolumeCapacity",
            Unavailable(_) => "Unavailable",
            Internal(_) => "InternalError",
        }
    }

    /// EC2's HTTP status for the code.
    pub fn status(&self) -> StatusCode {
        use Ec2Error::*;
        match self {
            AuthFailure(_) => StatusCode::UNAUTHORIZED,
            UnauthorizedOperation(_) => StatusCode::FORBIDDEN,
            DryRunOperation => StatusCode::PRECONDITION_FAILED,
            // EC2 lists InsufficientInstanceCapacity among its server errors (500).
            InsufficientInstanceCapacity(_) | InsufficientVolumeCapacity(_) | Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The error document.
    pub fn to_xml(&self, request_id: &str) -> String {
        let mut x = Xml::new();
        x.elem("Response", |x| {
            x.elem("Errors", |x| {
                x.elem("Error", |x| {
                    x.leaf("Code", self.code());
                    x.leaf("Message", &self.to_string());
                })
            });
            x.leaf("RequestID", request_id);
        });
        x.finish()
    }

    /// An operation's error, for an instance or image named by `id`.
    pub fn from_op(e: OpError) -> Ec2Error {
        match e {
            OpError::NotFound { kind, id } => not_found(kind, &id),
            OpError::Invalid(m) => Ec2Error::InvalidParameterValue(m),
            OpError::IncorrectState(m) => Ec2Error::IncorrectInstanceState(m),
            OpError::Conflict(m) => Ec2Error::InvalidParameterValue(m),
            OpError::NoCapacity(m) => Ec2Error::InsufficientInstanceCapacity(format!(
                "There is not enough capacity to fulfill your request: {m}"
            )),
            OpError::NoStorage(m) => Ec2Error::InsufficientVolumeCapacity(m),
            OpError::Unavailable(m) => Ec2Error::Unavailable(m),
            OpError::Store(e) => Ec2Error::Internal(format!("{e:?}")),
            OpError::Internal(m) => Ec2Error::Internal(m),
        }
    }
}

pub fn not_found(kind: &str, id: &str) -> Ec2Error {
    match kind {
        "instance" => Ec2Error::InstanceNotFound(format!("The instance ID '{id}' does not exist")),
        "image" => Ec2Error::AmiNotFound(format!("The image id '[{id}]' does not exist")),
        "security group" => {
            Ec2Error::GroupNotFound(format!("The security group '{id}' does not exist"))
        }
        "security group rule" => Ec2Error::PermissionNotFound(format!(
            "The specified rule does not exist in this security group: {id}"
        )),
        "key pair" => Ec2Error::KeyPairNotFound(format!("The key pair '{id}' does not exist")),
        "network" => Ec2Error::VpcNotFound(format!("The vpc ID '{id}' does not exist")),
        "address" => Ec2Error::AddressNotFound(format!("Address '{id}' not found.")),
        "volume" => Ec2Error::VolumeNotFound(format!("The volume '{id}' does not exist.")),
        "snapshot" => Ec2Error::SnapshotNotFound(format!("The snapshot '{id}' does not exist.")),
        other => Ec2Error::InvalidParameterValue(format!("{other} {id} not found")),
    }
}

impl From<OpError> for Ec2Error {
    fn from(e: OpError) -> Self {
        Ec2Error::from_op(e)
    }
}

impl From<StoreError> for Ec2Error {
    fn from(e: StoreError) -> Self {
        Ec2Error::from_op(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_document_is_what_botocore_parses() {
        let e = Ec2Error::InstanceNotFound("The instance ID 'i-<x>' does not exist".into());
        assert_eq!(
            e.to_xml("req-1"),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>InvalidInstanceID.NotFound</Code><Message>The instance ID &apos;i-&lt;x&gt;&apos; does not exist</Message></Error></Errors><RequestID>req-1</RequestID></Response>"
        );
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn statuses_follow_ec2() {
        let m = String::new;
        assert_eq!(Ec2Error::AuthFailure(m()).status().as_u16(), 401);
        assert_eq!(Ec2Error::UnauthorizedOperation(m()).status().as_u16(), 403);
        assert_eq!(Ec2Error::RequestExpired(m()).status().as_u16(), 400);
        assert_eq!(Ec2Error::DryRunOperation.status().as_u16(), 412);
        assert_eq!(
            Ec2Error::InsufficientInstanceCapacity(m())
                .status()
                .as_u16(),
            500
        );
        assert_eq!(Ec2Error::InvalidAction(m()).status().as_u16(), 400);
        assert_eq!(Ec2Error::UnsupportedOperation(m()).status().as_u16(), 400);
        assert_eq!(Ec2Error::AmiMalformed(m()).code(), "InvalidAMIID.Malformed");
        assert_eq!(
            Ec2Error::from_op(OpError::IncorrectState(m())).code(),
            "IncorrectInstanceState"
        );
        assert_eq!(
            Ec2Error::from_op(OpError::NotFound {
                kind: "image",
                id: "ami-1".into()
            })
            .code(),
            "InvalidAMIID.NotFound"
        );
        // Internal details never reach the client.
        let e = Ec2Error::Internal("db path /secret".into());
        assert!(!e.to_xml("r").contains("secret"));
    }
}
