//! EC2 security group and key pair actions.
