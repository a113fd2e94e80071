//! The opt-in Prometheus metrics (`[agent] metrics = "127.0.0.1:9464"`): what the proxy
//! measured and what the supervisor runs, in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::protocol::{InstanceStatus, RouteStatus};

/// A label value, escaped as the format wants (`\`, `"` and newlines).
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Writes one metric family: its help, its type, and a sample per `(labels, value)`.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// The exposition text for `routes` and `instances`.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn render(routes: &BTreeMap<String, RouteStatus>, instances: &[InstanceStatus]) -> String {
    let mut out = String::new();
    let upstreams: Vec<(String, &crate::protocol::UpstreamStatus)> = routes
        .iter()
        .flat_map(|(component, route)| {
            route.upstreams.iter().map(move |u| {
                let labels = format!(
                    "component=\"{}\",version=\"{}\",upstream=\"{}\"",
                    label(component),
                    label(&u.upstream.version),
                    label(&u.upstream.addr)
                );
                (labels, u)
            })
        })
        .collect();
    let each = |value: &dyn Fn(&crate::protocol::UpstreamStatus) -> Option<f64>| -> Vec<(String, f64)> {
        upstreams.iter().filter_map(|(labels, u)| value(u).map(|v| (labels.clone(), v))).collect()
    };
    family(
        &mut out,
        "upshift_proxy_requests_total",
        "counter",
        "Requests the proxy sent to the upstream since it joined the route.",
        &each(&|u| Some(u.requests as f64)),
    );
    family(
        &mut out,
        "upshift_proxy_errors_total",
        "counter",
        "Of those, the ones with no answer or a 5xx answer.",
        &each(&|u| Some(u.errors as f64)),
    );
    family(
        &mut out,
        "upshift_proxy_in_flight",
        "gauge",
        "Requests in flight to the upstream now.",
        &each(&|u| Some(u.in_flight as f64)),
    );
    family(
        &mut out,
        "upshift_proxy_weight",
        "gauge",
        "The upstream's weight: its share of new requests relative to the others'.",
        &each(&|u| Some(f64::from(u.upstream.weight))),
    );
    family(
        &mut out,
        "upshift_proxy_p99_seconds",
        "gauge",
        "p99 latency of the upstream's last answered requests since the route last changed.",
        &each(&|u| u.window.p99_ms.map(|ms| ms / 1000.0)),
    );
    let _ = writeln!(
        out,
        "# HELP upshift_proxy_latency_seconds Time to the upstream's answer (its headers) since it joined the route.\n\
         # TYPE upshift_proxy_latency_seconds histogram"
    );
    for (labels, u) in &upstreams {
        let Some(latencies) = &u.latencies else { continue };
        for (le, count) in latencies.le_seconds.iter().zip(&latencies.counts) {
            let _ = writeln!(out, "upshift_proxy_latency_seconds_bucket{{{labels},le=\"{le}\"}} {count}");
        }
        let _ = writeln!(out, "upshift_proxy_latency_seconds_bucket{{{labels},le=\"+Inf\"}} {}", u.requests);
        let _ = writeln!(out, "upshift_proxy_latency_seconds_sum{{{labels}}} {}", latencies.sum_seconds);
        let _ = writeln!(out, "upshift_proxy_latency_seconds_count{{{labels}}} {}", u.requests);
    }
    let processes: Vec<(String, &InstanceStatus)> = instances
        .iter()
        .map(|i| {
            let labels = format!(
                "component=\"{}\",slot=\"{}\",version=\"{}\"",
                label(&i.spec.component),
                label(&i.spec.slot),
                label(&i.spec.version)
            );
            (labels, i)
        })
        .collect();
    family(
        &mut out,
        "upshift_instance_up",
        "gauge",
        "Whether the instance's process runs (1) or not (0).",
        &processes.iter().map(|(l, i)| (l.clone(), if i.running { 1.0 } else { 0.0 })).collect::<Vec<_>>(),
    );
    family(
        &mut out,
        "upshift_instance_restarts_total",
        "counter",
        "Times the agent restarted the instance after it exited on its own.",
        &processes.iter().map(|(l, i)| (l.clone(), f64::from(i.restarts))).collect::<Vec<_>>(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Latencies, Spec, Upstream, UpstreamStatus, Window};

    #[test]
    fn renders_the_exposition_format() {
        let route = RouteStatus {
            listen: "127.0.0.1:8080".into(),
            upstreams: vec![UpstreamStatus {
                upstream: Upstream { addr: "127.0.0.1:4000".into(), version: "2.0.0".into(), weight: 1 },
                requests: 12,
                errors: 1,
                in_flight: 0,
                window: Window { seconds: 3.0, requests: 12, errors: 1, p99_ms: Some(4.5) },
                latencies: Some(Latencies { le_seconds: vec![0.005, 0.01], counts: vec![11, 12], sum_seconds: 0.04 }),
            }],
            versions: Vec::new(),
        };
        let instance = InstanceStatus {
            spec: Spec {
                component: "api".into(),
                slot: "blue".into(),
                version: "2.0.0".into(),
                command: vec!["x".into()],
                env: BTreeMap::new(),
                cwd: "/".into(),
                addr: None,
                serve: None,
            },
            pid: Some(1),
            running: true,
            restarts: 2,
            log: "/x.log".into(),
        };
        let text = render(&BTreeMap::from([("api".to_owned(), route)]), &[instance]);
        let labels = "component=\"api\",version=\"2.0.0\",upstream=\"127.0.0.1:4000\"";
        assert!(text.contains(&format!("upshift_proxy_requests_total{{{labels}}} 12\n")), "{text}");
        assert!(text.contains(&format!("upshift_proxy_errors_total{{{labels}}} 1\n")), "{text}");
        assert!(text.contains(&format!("upshift_proxy_p99_seconds{{{labels}}} 0.0045\n")), "{text}");
        assert!(text.contains("# TYPE upshift_proxy_requests_total counter\n"), "{text}");
        assert!(text.contains("# TYPE upshift_proxy_latency_seconds histogram\n"), "{text}");
        for sample in [
            format!("upshift_proxy_latency_seconds_bucket{{{labels},le=\"0.005\"}} 11\n"),
            format!("upshift_proxy_latency_seconds_bucket{{{labels},le=\"+Inf\"}} 12\n"),
            format!("upshift_proxy_latency_seconds_sum{{{labels}}} 0.04\n"),
            format!("upshift_proxy_latency_seconds_count{{{labels}}} 12\n"),
        ] {
            assert!(text.contains(&sample), "{sample} in {text}");
        }
        assert!(
            text.contains("upshift_instance_restarts_total{component=\"api\",slot=\"blue\",version=\"2.0.0\"} 2\n")
        );
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
