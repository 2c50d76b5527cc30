//! The CSI plugin's errors and the one place they become gRPC statuses. Kubelet retries every
//! failed NodePublishVolume with backoff; the codes still matter to people reading events and to
//! the CSI sanity suite, so each is chosen on purpose.

use tonic::{Code, Status};

/// A failed CSI call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// Another operation on the same volume is in flight.
    #[error("an operation on volume {0} is already in progress; retry")]
    Busy(String),
    /// The model is still being downloaded; kubelet's retry will find it further along.
    #[error("{0}")]
    Fetching(String),
    /// The target is already published with something else.
    #[error("{0}")]
    AlreadyExists(String),
    /// The volume is not published at the target named.
    #[error("{0}")]
    NotFound(String),
    /// The agent failed or refused; its code is kept.
    #[error("agent: {action}: {}", status.message())]
    Agent {
        /// What the plugin asked for.
        action: &'static str,
        /// The agent's answer.
        status: Status,
    },
    /// The agent answered something the plugin must not act on.
    #[error("agent: {0}")]
    BadAnswer(String),
    /// A mount, unmount or directory operation failed.
    #[error("{action} {target}: {source}")]
    Mount {
        /// What failed.
        action: &'static str,
        /// The path.
        target: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Busy(_) => Code::Aborted,
            Error::Fetching(_) => Code::Unavailable,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::NotFound(_) => Code::NotFound,
            Error::Agent { status, .. } => match status.code() {
                // The agent is down or restarting: kubelet should retry.
                Code::Unknown | Code::Cancelled => Code::Unavailable,
                c => c,
            },
            Error::Mount { .. } | Error::BadAnswer(_) => Code::Internal,
        };
        Status::new(code, clip(&e.to_string()))
    }
}

pub use modelcache_core::repo::{MAX_MESSAGE, clip};

/// Result of a CSI operation.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let code = |e: Error| Status::from(e).code();
        assert_eq!(
            code(Error::InvalidArgument("x".into())),
            Code::InvalidArgument
        );
        assert_eq!(code(Error::Busy("v".into())), Code::Aborted);
        assert_eq!(code(Error::Fetching("f".into())), Code::Unavailable);
        assert_eq!(code(Error::AlreadyExists("a".into())), Code::AlreadyExists);
        let agent = |s: Status| Error::Agent {
            action: "ensure",
            status: s,
        };
        assert_eq!(code(agent(Status::not_found("no repo"))), Code::NotFound);
        assert_eq!(
            code(agent(Status::permission_denied("gated"))),
            Code::PermissionDenied
        );
        assert_eq!(code(agent(Status::unknown("transport"))), Code::Unavailable);
        let io = std::io::Error::from_raw_os_error(1);
        assert_eq!(
            code(Error::Mount {
                action: "mount",
                target: "/t".into(),
                source: io
            }),
            Code::Internal
        );
        let msg = Status::from(agent(Status::not_found("repo o/r was not found")))
            .message()
            .to_owned();
        assert_eq!(msg, "agent: ensure: repo o/r was not found");
    }

    #[test]
    fn messages_are_capped() {
        let long = "é".repeat(100_000);
        let status = Status::from(Error::InvalidArgument(long.clone()));
        assert!(
            status.message().len() < MAX_MESSAGE + 40,
            "{}",
            status.message().len()
        );
        assert!(status.message().ends_with("bytes more)"));
        let agent = Status::from(Error::Agent {
            action: "ensure",
            status: Status::invalid_argument(long),
        });
        assert!(agent.message().len() < MAX_MESSAGE + 40);
        assert_eq!(clip("short"), "short");
    }
}
