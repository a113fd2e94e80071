//! `[database] via = { kubernetes = { pod, port } }`: a port-forward tunnel to a pod
//! through the API server, what `kubectl port-forward` does, for as long as this process
//! runs. `migrate`, `backup` and `restore` (and the tools they run, `pg_dump` and
//! `pg_restore`) connect to its local end on 127.0.0.1, so a database that the cluster
//! does not publish is reached without a shell pipeline through `kubectl exec`.

use std::net::SocketAddr;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use upshift_core::driver::DriverError;

/// Where to forward to.
pub struct TunnelTarget<'a> {
    /// The kubeconfig context (`None`: the current one, or the pod's service account).
    pub context: Option<&'a str>,
    /// The namespace (`None`: the context's).
    pub namespace: Option<&'a str>,
    /// The pod.
    pub pod: &'a str,
    /// The pod's port.
    pub port: u16,
}

/// Opens a tunnel to `target`'s port and returns its local address. The pod must be
/// running; each connection to the local end opens its own port-forward stream. The
/// tunnel's thread ends with the process.
pub fn tunnel(target: &TunnelTarget<'_>) -> Result<SocketAddr, DriverError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DriverError::Refused(format!("starting the tunnel's runtime: {e}")))?;
    let (pods, listener) = runtime.block_on(async {
        let client = crate::kubernetes::connect(target.context).await?;
        let namespace = target.namespace.map_or_else(|| client.default_namespace().to_owned(), str::to_owned);
        let pods: Api<Pod> = Api::namespaced(client, &namespace);
        let pod = match pods.get(target.pod).await {
            Ok(pod) => pod,
            Err(kube::Error::Api(status)) if status.code == 404 => {
                return Err(DriverError::Refused(format!(
                    "[database] via: pod {} does not exist in namespace {namespace}",
                    target.pod
                )));
            }
            Err(e) => return Err(DriverError::Unavailable(format!("the Kubernetes API: {e}"))),
        };
        let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
        if phase != "Running" {
            return Err(DriverError::Unavailable(format!(
                "[database] via: pod {} in namespace {namespace} is {}, not Running",
                target.pod,
                if phase.is_empty() { "not started" } else { &phase }
            )));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| DriverError::Unavailable(format!("listening for the tunnel on 127.0.0.1: {e}")))?;
        Ok((pods, listener))
    })?;
    let local = listener.local_addr().map_err(|e| DriverError::Unavailable(format!("the tunnel's address: {e}")))?;
    let (pod, port) = (target.pod.to_owned(), target.port);
    std::thread::Builder::new()
        .name("upshift-tunnel".into())
        .spawn(move || runtime.block_on(serve(&listener, &pods, &pod, port)))
        .map_err(|e| DriverError::Unavailable(format!("starting the tunnel's thread: {e}")))?;
    Ok(local)
}

/// Accepts connections on the local end, each forwarded on its own stream.
async fn serve(listener: &tokio::net::TcpListener, pods: &Api<Pod>, pod: &str, port: u16) {
    while let Ok((mut local, _)) = listener.accept().await {
        let (pods, pod) = (pods.clone(), pod.to_owned());
        tokio::spawn(async move {
            let forwarded = async {
                let mut forwarder = pods.portforward(&pod, &[port]).await.map_err(|e| e.to_string())?;
                let mut remote = forwarder.take_stream(port).ok_or("the API server opened no stream")?;
                tokio::io::copy_bidirectional(&mut local, &mut remote).await.map_err(|e| e.to_string())?;
                drop(remote);
                forwarder.join().await.map_err(|e| e.to_string())
            };
            if let Err(e) = forwarded.await {
                crate::say_aloud(&format!("warning: the tunnel to pod {pod} port {port}: {e}"));
            }
        });
    }
}
