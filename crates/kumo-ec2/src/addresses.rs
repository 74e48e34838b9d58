//! EC2 elastic IP (and VPC) actions.
