//! The plugin's two gRPC services on one socket (Identity with Node, or with Controller),
//! routed by the service name in the request path. tonic's own router would link axum, which
//! the plugin has no other use for.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::server::NamedService;
use tower::{Service, ServiceExt};

/// Two services, each answering the paths under its name (`/csi.v1.Node/…`); any other path
/// is `UNIMPLEMENTED`, as gRPC servers answer an unknown service.
#[derive(Debug, Clone)]
pub struct Routes<A, B> {
    first: A,
    second: B,
}

impl<A, B> Routes<A, B> {
    /// Serves `first` and `second`.
    pub fn new(first: A, second: B) -> Self {
        Routes { first, second }
    }
}

/// True when `path` is a method of service `S`.
fn serves<S: NamedService>(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(S::NAME))
        .is_some_and(|rest| rest.starts_with('/'))
}

type Answer = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<A, B> Service<http::Request<Body>> for Routes<A, B>
where
    A: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + 'static,
    A::Future: Send + 'static,
    B: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + 'static,
    B::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Each call readies its own clone of the service it goes to.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Answer {
        let path = req.uri().path();
        if serves::<A>(path) {
            Box::pin(self.first.clone().oneshot(req))
        } else if serves::<B>(path) {
            Box::pin(self.second.clone().oneshot(req))
        } else {
            let status = tonic::Status::unimplemented(format!(
                "no service answers {}",
                crate::error::clip(path)
            ));
            Box::pin(std::future::ready(Ok(status.into_http())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::ControllerService;
    use crate::identity::IdentityService;
    use modelcache_proto::csi_v1::controller_server::ControllerServer;
    use modelcache_proto::csi_v1::identity_server::IdentityServer;

    fn grpc_status(resp: &http::Response<Body>) -> Option<&str> {
        resp.headers().get("grpc-status")?.to_str().ok()
    }

    #[tokio::test]
    async fn each_path_goes_to_its_service_and_others_are_unimplemented() {
        let identity = IdentityServer::new(IdentityService::<crate::agent::AgentClient>::new(None));
        let controller = ControllerServer::new(ControllerService::default());
        let mut routes = Routes::new(identity, controller);
        let call = |path: &str| {
            http::Request::builder()
                .method("POST")
                .uri(format!("http://localhost{path}"))
                .header("content-type", "application/grpc")
                .body(Body::empty())
                .unwrap()
        };
        // An empty body is no message: the service itself answers, with its own error.
        for path in [
            "/csi.v1.Identity/GetPluginInfo",
            "/csi.v1.Controller/ControllerGetCapabilities",
        ] {
            let resp = routes.call(call(path)).await.unwrap();
            assert_ne!(grpc_status(&resp), Some("12"), "{path} was not routed");
        }
        for path in [
            "/csi.v1.Node/NodeGetInfo",
            "/csi.v1.IdentityX/GetPluginInfo",
            "/",
        ] {
            let resp = routes.call(call(path)).await.unwrap();
            assert_eq!(grpc_status(&resp), Some("12"), "{path}");
        }
    }
}
