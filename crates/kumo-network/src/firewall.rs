//! nftables rulesets rendered whole from the desired state (see the module's functions).
