//! A gRPC test service, written against tonic's runtime API directly so the tests need no
//! `.proto` compiler.
//!
//! `test.Echo/Unary` echoes its message (or fails with `INVALID_ARGUMENT` when the message is
//! `fail`); `test.Echo/Stream` sends `count` replies, then ends with `status` (0 = OK), which
//! travels in the HTTP/2 trailers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::{BoxFuture, Service, http};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(uint32, tag = "2")]
    pub count: u32,
    #[prost(int32, tag = "3")]
    pub status: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
}

pub const UNARY: &str = "/test.Echo/Unary";
pub const STREAM: &str = "/test.Echo/Stream";

#[derive(Clone, Debug, Default)]
pub struct EchoServer;

impl tonic::server::NamedService for EchoServer {
    const NAME: &'static str = "test.Echo";
}

struct Unary;

impl tonic::server::UnaryService<EchoRequest> for Unary {
    type Response = EchoReply;
    type Future = BoxFuture<tonic::Response<EchoReply>, tonic::Status>;
    fn call(&mut self, req: tonic::Request<EchoRequest>) -> Self::Future {
        Box::pin(async move {
            let msg = req.into_inner().message;
            if msg == "fail" {
                return Err(tonic::Status::invalid_argument("asked to fail"));
            }
            Ok(tonic::Response::new(EchoReply { message: msg }))
        })
    }
}

struct Streaming;

type ReplyStream = Pin<Box<dyn futures::Stream<Item = Result<EchoReply, tonic::Status>> + Send>>;

impl tonic::server::ServerStreamingService<EchoRequest> for Streaming {
    type Response = EchoReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<tonic::Response<ReplyStream>, tonic::Status>;
    fn call(&mut self, req: tonic::Request<EchoRequest>) -> Self::Future {
        Box::pin(async move {
            let req = req.into_inner();
            let mut items: Vec<Result<EchoReply, tonic::Status>> = (0..req.count)
                .map(|i| {
                    Ok(EchoReply {
                        message: format!("{} {i}", req.message),
                    })
                })
                .collect();
            if req.status != 0 {
                items.push(Err(tonic::Status::new(
                    tonic::Code::from(req.status),
                    "stream ended with an error",
                )));
            }
            let stream: ReplyStream = Box::pin(futures::stream::iter(items));
            Ok(tonic::Response::new(stream))
        })
    }
}

impl<B> Service<http::Request<B>> for EchoServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match req.uri().path() {
            UNARY => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.unary(Unary, req).await)
            }),
            STREAM => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.server_streaming(Streaming, req).await)
            }),
            _ => Box::pin(
                async move { Ok(tonic::Status::unimplemented("no such method").into_http()) },
            ),
        }
    }
}

/// Starts the gRPC server on an ephemeral loopback port.
pub async fn start() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(EchoServer)
            .serve_with_incoming(incoming)
            .await;
    });
    (addr, task)
}

/// A gRPC client that connects to `via` (a proxy's outbound listener) and names `authority`
/// as the service it calls.
pub async fn client(
    via: SocketAddr,
    authority: &str,
) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{via}"))
        .unwrap()
        .origin(format!("http://{authority}").parse().unwrap())
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

pub fn call_unary(
    mut grpc: tonic::client::Grpc<tonic::transport::Channel>,
    message: &str,
) -> impl Future<Output = Result<tonic::Response<EchoReply>, tonic::Status>> {
    let req = tonic::Request::new(EchoRequest {
        message: message.into(),
        count: 0,
        status: 0,
    });
    async move {
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unknown(e.to_string()))?;
        grpc.unary(
            req,
            http::uri::PathAndQuery::from_static(UNARY),
            ProstCodec::default(),
        )
        .await
    }
}

/// Calls `Stream` and collects every reply, then the final status.
pub async fn call_stream(
    mut grpc: tonic::client::Grpc<tonic::transport::Channel>,
    count: u32,
    status: tonic::Code,
) -> (Vec<String>, Result<Option<http::HeaderMap>, tonic::Status>) {
    let req = tonic::Request::new(EchoRequest {
        message: "item".into(),
        count,
        status: status as i32,
    });
    grpc.ready().await.unwrap();
    let resp = match grpc
        .server_streaming::<_, EchoReply, _>(
            req,
            http::uri::PathAndQuery::from_static(STREAM),
            ProstCodec::default(),
        )
        .await
    {
        Ok(r) => r,
        Err(s) => return (vec![], Err(s)),
    };
    let mut stream = resp.into_inner();
    let mut got = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(m)) => got.push(m.message),
            Ok(None) => break,
            Err(s) => return (got, Err(s)),
        }
    }
    let trailers = stream.trailers().await.map(|t| t.map(|m| m.into_headers()));
    (got, trailers)
}
