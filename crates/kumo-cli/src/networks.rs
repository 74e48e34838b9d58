//! `kumo network ...`, `kumo address-pool ...` and `kumo address ...`.
