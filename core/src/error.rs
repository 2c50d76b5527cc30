//! What kind of failure an error is. Each error type of the agent says its own [`Class`]; the
//! one place that turns errors into gRPC statuses asks for it and maps it with [`Class::code`],
//! so no handler chooses a code by matching another layer's variants.

/// The kinds of failure a caller acts on differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The request is malformed: fix it, do not retry it.
    Invalid,
    /// What it names does not exist.
    NotFound,
    /// The caller may not have it.
    Denied,
    /// Try again: a hub outage, a rate limit, a shutdown, a broken connection.
    Unavailable,
    /// The disk (or a quota) is full.
    Exhausted,
    /// The request is well formed, but the state of things refuses it.
    Precondition,
    /// Bytes were not what they had to be.
    DataLoss,
    /// A bug or an unexpected system failure.
    Internal,
}

impl Class {
    /// The gRPC code of this class.
    pub fn code(self) -> tonic::Code {
        use tonic::Code;
        match self {
            Class::Invalid => Code::InvalidArgument,
            Class::NotFound => Code::NotFound,
            Class::Denied => Code::PermissionDenied,
            Class::Unavailable => Code::Unavailable,
            Class::Exhausted => Code::ResourceExhausted,
            Class::Precondition => Code::FailedPrecondition,
            Class::DataLoss => Code::DataLoss,
            Class::Internal => Code::Internal,
        }
    }

    /// The class of an I/O error: a full disk or quota is [`Class::Exhausted`], anything else
    /// [`Class::Internal`].
    pub fn of_io(e: &std::io::Error) -> Class {
        if is_no_space(e) {
            Class::Exhausted
        } else {
            Class::Internal
        }
    }
}

/// True for ENOSPC and EDQUOT: the disk or a quota is full, and freeing space may cure it.
pub fn is_no_space(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_or_quota_is_exhausted_other_io_errors_internal() {
        for errno in [28, 122] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert_eq!(Class::of_io(&e).code(), tonic::Code::ResourceExhausted);
        }
        let eio = std::io::Error::from_raw_os_error(5);
        assert_eq!(Class::of_io(&eio), Class::Internal);
    }
}
