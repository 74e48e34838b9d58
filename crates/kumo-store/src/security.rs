//! Security groups, their rules, instance memberships, and key pairs.
