//! The EC2 instance state machine. Only the controller moves an instance between states,
//! and only along the transitions listed here.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    Pending,
    Running,
    Stopping,
    Stopped,
    ShuttingDown,
    Terminated,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::ShuttingDown => "shutting-down",
            InstanceState::Terminated => "terminated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => InstanceState::Pending,
            "running" => InstanceState::Running,
            "stopping" => InstanceState::Stopping,
            "stopped" => InstanceState::Stopped,
            "shutting-down" => InstanceState::ShuttingDown,
            "terminated" => InstanceState::Terminated,
            _ => return None,
        })
    }

    /// EC2's numeric state codes.
    pub fn code(self) -> u16 {
        match self {
            InstanceState::Pending => 0,
            InstanceState::Running => 16,
            InstanceState::ShuttingDown => 32,
            InstanceState::Terminated => 48,
            InstanceState::Stopping => 64,
            InstanceState::Stopped => 80,
        }
    }

    pub fn valid_transition(self, to: InstanceState) -> bool {
        use InstanceState::*;
        if self == to {
            return true;
        }
        matches!(
            (self, to),
            (Pending, Running)
                | (Pending, Stopping)
                | (Pending, Stopped)
                | (Pending, ShuttingDown)
                | (Running, Stopping)
                | (Running, Stopped)
                | (Running, ShuttingDown)
                | (Running, Pending)
                | (Stopping, Stopped)
                | (Stopping, ShuttingDown)
                | (Stopped, Pending)
                | (Stopped, ShuttingDown)
                | (ShuttingDown, Terminated)
        )
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::InstanceState::*;
    use super::*;

    #[test]
    fn terminated_is_final() {
        for s in [Pending, Running, Stopping, Stopped, ShuttingDown] {
            assert!(!Terminated.valid_transition(s));
        }
    }

    #[test]
    fn names_round_trip() {
        for s in [
            Pending,
            Running,
            Stopping,
            Stopped,
            ShuttingDown,
            Terminated,
        ] {
            assert_eq!(InstanceState::parse(s.as_str()), Some(s));
            let json = serde_json::to_string(&s).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        assert_eq!(ShuttingDown.code(), 32);
    }

    #[test]
    fn stopped_cannot_jump_to_running() {
        assert!(!Stopped.valid_transition(Running));
        assert!(Stopped.valid_transition(Pending));
    }
}
