//! The strategies, over any driver that can run instances of a version and point the
//! agent's proxy at them ([`Instances`]). The process driver implements it over the agent;
//! the Compose driver is to implement it over containers and reuse all of this.
//!
//! `recreate` stops the old instance (SIGTERM, `drain` to finish, then SIGKILL) and starts
//! the new one on the same address, then waits for its health check. `blue-green` starts the
//! new version beside the old one on a free port (the other of the `blue` and `green`
//! slots), waits for its health check, switches the proxy on the component's stable address
//! to it in one step, waits for the old one's requests to finish (up to `drain`), and stops
//! it. `rolling` runs `instances` copies behind the proxy and replaces them one at a time:
//! start a new one, health-gate it, route to it and away from one old one (which drains),
//! stop that old one. `canary` starts `instances` new ones beside the old ones, health-gates
//! them, and gives them a growing share of requests (`steps`), judging each step by what the
//! proxy measured of the new version over `step_interval`: too few requests to judge, an
//! error rate over `max_error_rate` (default 1%) or a p99 over `max_p99_ms` stops the
//! rollout, and the runner puts the old version back. After the last step the old ones drain
//! and stop.

use std::net::TcpListener;

use upshift_agent::{RouteStatus, Upstream};
use upshift_core::driver::{Deployed, DriverError, JUDGE_MIN_REQUESTS};
use upshift_core::manifest::{Component, Strategy};

/// One running copy of a component.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// Its slot: `live` (recreate), `blue`/`green`, or `<version>#<i>` (rolling, canary).
    pub slot: String,
    /// The version it runs.
    pub version: String,
    /// Where it listens.
    pub addr: Option<String>,
    /// Whether it runs now.
    pub running: bool,
}

/// What the strategies need of a driver.
pub trait Instances {
    /// Every instance of `component`, and the proxy's route for it.
    fn observe(&mut self, component: &Component) -> Result<(Vec<Instance>, Option<RouteStatus>), DriverError>;

    /// Starts `version` of `component` in `slot`, listening on `addr` (no health wait).
    fn start(
        &mut self,
        component: &Component,
        version: &str,
        slot: &str,
        addr: Option<&str>,
    ) -> Result<Instance, DriverError>;

    /// Stops the instance in `slot` (SIGTERM, `drain`, then SIGKILL); none there is fine.
    fn stop(&mut self, component: &Component, slot: &str) -> Result<(), DriverError>;

    /// Waits for the instance's health check (up to its deadline).
    fn wait_healthy(&self, component: &Component, instance: &Instance) -> Result<(), DriverError>;

    /// One health check of the instance, no waiting.
    fn healthy_now(&self, component: &Component, instance: &Instance) -> bool;

    /// Points the proxy on the component's stable address at `upstreams`, waiting for the
    /// ones it leaves to drain.
    fn route(&mut self, component: &Component, upstreams: Vec<Upstream>) -> Result<(), DriverError>;

    /// The address a `recreate` instance listens on: the stable one, else the one the old
    /// instance had (`previous`), else a free port when the component takes an address.
    fn recreate_address(&self, component: &Component, previous: Option<&str>) -> Result<Option<String>, DriverError>;
}

/// The slot of the instance that serves under `recreate`.
pub const LIVE: &str = "live";

/// Whether the component is served through the agent's proxy.
pub fn behind_proxy(component: &Component) -> bool {
    matches!(component.strategy, Strategy::BlueGreen | Strategy::Rolling | Strategy::Canary)
}

/// The addresses the proxy routes to.
fn routed(route: Option<&RouteStatus>) -> Vec<String> {
    route.map(|r| r.upstreams.iter().map(|u| u.upstream.addr.clone()).collect()).unwrap_or_default()
}

/// Whether the proxy routes to `instance`.
fn serves(instance: &Instance, routed: &[String]) -> bool {
    instance.addr.as_ref().is_some_and(|a| routed.contains(a))
}

/// `instance` as an upstream of the proxy.
fn upstream(instance: &Instance, weight: u32) -> Upstream {
    Upstream { addr: instance.addr.clone().unwrap_or_default(), version: instance.version.clone(), weight }
}

/// A free loopback address.
pub fn free_address() -> Result<String, DriverError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| DriverError::Unavailable(format!("no free port on 127.0.0.1: {e}")))?;
    Ok(listener.local_addr().map_err(|e| DriverError::Unavailable(e.to_string()))?.to_string())
}

/// Whether the new version passes a canary step, from what the proxy measured of it.
pub(crate) fn judge(
    component: &Component,
    version: &str,
    share: u32,
    route: Option<&RouteStatus>,
) -> Result<String, String> {
    let window = route
        .and_then(|r| r.versions.iter().find(|v| v.version == version))
        .map(|v| v.window.clone())
        .unwrap_or_default();
    let at = format!("canary at {share}%: {version}");
    let p99 = window.p99_ms.map_or_else(|| "-".to_owned(), |p| format!("{p:.1} ms"));
    let figures =
        format!("{} requests, {} errors, p99 {p99}, in {:.1}s", window.requests, window.errors, window.seconds);
    if window.requests < JUDGE_MIN_REQUESTS {
        return Err(format!(
            "{at} got {figures}: too little traffic to judge (at least {JUDGE_MIN_REQUESTS} requests are needed), \
             so the canary does not pass; send traffic or lengthen step_interval"
        ));
    }
    if let Some(broken) = upshift_core::driver::limits_broken(component, window.requests, window.errors, window.p99_ms)
    {
        return Err(format!("{at} got {figures}: {broken}"));
    }
    Ok(format!("{at} got {figures}: passed"))
}

/// The instance that serves: one the proxy routes to (behind the proxy), else the `live`
/// one; with whether it runs.
pub fn live(instances: &mut dyn Instances, component: &Component) -> Result<Option<Instance>, DriverError> {
    let (all, route) = instances.observe(component)?;
    Ok(live_of(component, &all, route.as_ref()).cloned())
}

/// [`live`], from what a driver already observed.
pub fn live_of<'a>(component: &Component, all: &'a [Instance], route: Option<&RouteStatus>) -> Option<&'a Instance> {
    let routed = routed(route);
    all.iter().find(|i| if behind_proxy(component) { serves(i, &routed) } else { i.slot == LIVE })
}

/// Rolls `version` out with the component's strategy.
pub fn deploy(
    instances: &mut dyn Instances,
    component: &Component,
    version: &str,
    say: &dyn Fn(&str),
) -> Result<(), DriverError> {
    match component.strategy {
        Strategy::Recreate => recreate(instances, component, version, None),
        Strategy::BlueGreen => switch_to(instances, component, version),
        Strategy::Rolling => roll_to(instances, component, version),
        Strategy::Canary => canary_to(instances, component, version, &component.steps, say),
    }
}

/// Stops the live instance and starts `version` in its place: on `addr` when given (a put
/// back to the address it had), else where [`Instances::recreate_address`] says.
fn recreate(
    instances: &mut dyn Instances,
    component: &Component,
    version: &str,
    addr: Option<&str>,
) -> Result<(), DriverError> {
    let addr = if let Some(addr) = addr {
        Some(addr.to_owned())
    } else {
        let previous = live(instances, component)?.and_then(|i| i.addr);
        instances.recreate_address(component, previous.as_deref())?
    };
    instances.stop(component, LIVE)?;
    let started = instances.start(component, version, LIVE, addr.as_deref())?;
    instances.wait_healthy(component, &started)
}

/// The instances the proxy routes to and that run, after stopping the ones it does not
/// route to (leftovers of an attempt that failed before its undo).
fn serving_after_leftovers(instances: &mut dyn Instances, component: &Component) -> Result<Vec<Instance>, DriverError> {
    let (all, route) = instances.observe(component)?;
    let routed = routed(route.as_ref());
    for leftover in all.iter().filter(|i| !serves(i, &routed)) {
        instances.stop(component, &leftover.slot)?;
    }
    Ok(all.into_iter().filter(|i| i.running && serves(i, &routed)).collect())
}

/// Starts `version` in `slot` (stopping a leftover there first) on a free port, and waits
/// for its health check.
fn start_healthy(
    instances: &mut dyn Instances,
    component: &Component,
    version: &str,
    slot: &str,
) -> Result<Instance, DriverError> {
    instances.stop(component, slot)?;
    let addr = free_address()?;
    let started = instances.start(component, version, slot, Some(&addr))?;
    instances.wait_healthy(component, &started)?;
    Ok(started)
}

/// Replaces the serving instances with `instances` new ones of `version`, one at a time.
fn roll_to(instances: &mut dyn Instances, component: &Component, version: &str) -> Result<(), DriverError> {
    let olds = serving_after_leftovers(instances, component)?;
    let count = usize::try_from(component.instances).unwrap_or(1);
    let mut news: Vec<Instance> = Vec::new();
    for i in 0..count {
        news.push(start_healthy(instances, component, version, &format!("{version}#{i}"))?);
        // Route to the new ones and the olds not yet retired; the retired one drains.
        let keep: Vec<Upstream> = olds.iter().skip(i + 1).chain(&news).map(|s| upstream(s, 1)).collect();
        instances.route(component, keep)?;
        if let Some(old) = olds.get(i) {
            instances.stop(component, &old.slot)?;
        }
    }
    // Fewer instances than before: the olds left over.
    instances.route(component, news.iter().map(|s| upstream(s, 1)).collect())?;
    for old in olds.iter().skip(count) {
        instances.stop(component, &old.slot)?;
    }
    Ok(())
}

/// Starts `instances` of `version` beside the serving ones, gives them each canary share in
/// turn (when anything served before), then all requests; the old ones drain and stop. With
/// `steps` empty it switches at once (an undo).
fn canary_to(
    instances: &mut dyn Instances,
    component: &Component,
    version: &str,
    steps: &[u32],
    say: &dyn Fn(&str),
) -> Result<(), DriverError> {
    let olds = serving_after_leftovers(instances, component)?;
    let mut news: Vec<Instance> = Vec::new();
    for i in 0..component.instances {
        news.push(start_healthy(instances, component, version, &format!("{version}#{i}"))?);
    }
    let (old_count, new_count) = (u32::try_from(olds.len()).unwrap_or(1), u32::try_from(news.len()).unwrap_or(1));
    for &share in steps.iter().filter(|s| **s < 100) {
        if olds.is_empty() {
            break;
        }
        // Weights in proportion: the new ones together get `share` percent.
        let upstreams = olds
            .iter()
            .map(|s| upstream(s, (100 - share) * new_count))
            .chain(news.iter().map(|s| upstream(s, share * old_count)))
            .collect();
        instances.route(component, upstreams)?;
        std::thread::sleep(component.step_interval);
        let (_, route) = instances.observe(component)?;
        let verdict = judge(component, version, share, route.as_ref()).map_err(DriverError::Breached)?;
        say(&format!("  {} {verdict}", component.name));
    }
    instances.route(component, news.iter().map(|s| upstream(s, 1)).collect())?;
    for old in &olds {
        instances.stop(component, &old.slot)?;
    }
    Ok(())
}

/// Starts `version` in a free slot on a free port, health-gated, switches the proxy to it,
/// and stops every other instance of the component.
fn switch_to(instances: &mut dyn Instances, component: &Component, version: &str) -> Result<(), DriverError> {
    let (all, _) = instances.observe(component)?;
    let slot = if all.iter().any(|i| i.slot == "blue" && i.running) { "green" } else { "blue" };
    // A leftover in that slot (an attempt that failed before its undo) goes first.
    let started = start_healthy(instances, component, version, slot)?;
    instances.route(component, vec![upstream(&started, 1)])?;
    for old in all.iter().filter(|i| i.slot != slot) {
        instances.stop(component, &old.slot)?;
    }
    Ok(())
}

/// Puts `previous` back in place of what runs for `component` (or stops it all). A no-op
/// when the previous version already is what serves.
pub fn put_back(
    instances: &mut dyn Instances,
    component: &Component,
    previous: Option<&Deployed>,
) -> Result<(), DriverError> {
    if !behind_proxy(component) {
        let Some(previous) = previous else { return instances.stop(component, LIVE) };
        let old = previous.spec(component).clone();
        if let Some(running) = live(instances, component)?
            && running.running
            && running.version == previous.version
            && instances.healthy_now(&old, &running)
        {
            return Ok(());
        }
        return recreate(instances, &old, &previous.version, previous.detail["addr"].as_str());
    }
    let (all, route) = instances.observe(component)?;
    let routed = routed(route.as_ref());
    let serving = |i: &Instance| serves(i, &routed);
    let previous_serving: Vec<&Instance> =
        all.iter().filter(|i| i.running && serving(i) && previous.is_some_and(|p| p.version == i.version)).collect();
    match previous {
        // A canary stopped midway: the old ones still serve, so they take every request
        // again and the new ones drain and stop.
        Some(_) if component.strategy == Strategy::Canary && !previous_serving.is_empty() => {
            instances.route(component, previous_serving.iter().map(|s| upstream(s, 1)).collect())?;
            for other in all.iter().filter(|i| !previous_serving.contains(i)) {
                instances.stop(component, &other.slot)?;
            }
            Ok(())
        }
        // Only the previous version serves (the new one never got traffic): stop the rest.
        Some(previous)
            if all.iter().any(|i| i.running && serving(i))
                && all.iter().filter(|i| serving(i)).all(|i| i.version == previous.version) =>
        {
            for other in all.iter().filter(|i| !serving(i)) {
                instances.stop(component, &other.slot)?;
            }
            Ok(())
        }
        // The previous version starts again from its own recorded spec.
        Some(previous) => {
            let old = previous.spec(component).clone();
            match old.strategy {
                Strategy::Rolling => roll_to(instances, &old, &previous.version),
                Strategy::Canary => canary_to(instances, &old, &previous.version, &[], &|_| {}),
                Strategy::BlueGreen | Strategy::Recreate => switch_to(instances, &old, &previous.version),
            }
        }
        None => {
            if !routed.is_empty() {
                instances.route(component, Vec::new())?;
            }
            for instance in &all {
                instances.stop(component, &instance.slot)?;
            }
            Ok(())
        }
    }
}

/// Health of every instance that serves (behind the proxy), or of the live one.
pub fn check_health(instances: &mut dyn Instances, component: &Component) -> Result<(), DriverError> {
    if behind_proxy(component) {
        let (all, route) = instances.observe(component)?;
        let routed = routed(route.as_ref());
        let serving: Vec<Instance> = all.into_iter().filter(|i| serves(i, &routed)).collect();
        if serving.is_empty() {
            return Err(DriverError::Unhealthy(format!("{} is not deployed", component.name)));
        }
        return serving.iter().try_for_each(|i| instances.wait_healthy(component, i));
    }
    match live(instances, component)? {
        Some(instance) if instance.running => instances.wait_healthy(component, &instance),
        Some(instance) => {
            Err(DriverError::Unhealthy(format!("{} {} is not running", component.name, instance.version)))
        }
        None => Err(DriverError::Unhealthy(format!("{} is not deployed", component.name))),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeSet;
    use std::time::Duration;

    use upshift_agent::{UpstreamStatus, VersionStatus, Window};
    use upshift_core::manifest::{DriverSpec, Health, Probe, ProcessSpec};

    use super::*;

    /// Instances in memory: what runs, what the proxy routes to, and every action in order.
    #[derive(Default)]
    struct Fake {
        running: Vec<Instance>,
        routed: Vec<Upstream>,
        unhealthy: BTreeSet<String>,
        log: RefCell<Vec<String>>,
    }

    impl Instances for Fake {
        fn observe(&mut self, _: &Component) -> Result<(Vec<Instance>, Option<RouteStatus>), DriverError> {
            let route = (!self.routed.is_empty()).then(|| RouteStatus {
                listen: "127.0.0.1:1".into(),
                upstreams: self
                    .routed
                    .iter()
                    .map(|u| UpstreamStatus {
                        upstream: u.clone(),
                        requests: 0,
                        errors: 0,
                        in_flight: 0,
                        window: Window::default(),
                        latencies: None,
                    })
                    .collect(),
                versions: Vec::new(),
            });
            Ok((self.running.clone(), route))
        }

        fn start(
            &mut self,
            _: &Component,
            version: &str,
            slot: &str,
            addr: Option<&str>,
        ) -> Result<Instance, DriverError> {
            self.log.borrow_mut().push(format!("start {slot} {version}"));
            let instance =
                Instance { slot: slot.into(), version: version.into(), addr: addr.map(str::to_owned), running: true };
            self.running.push(instance.clone());
            Ok(instance)
        }

        fn stop(&mut self, _: &Component, slot: &str) -> Result<(), DriverError> {
            if self.running.iter().any(|i| i.slot == slot) {
                self.log.borrow_mut().push(format!("stop {slot}"));
            }
            self.running.retain(|i| i.slot != slot);
            Ok(())
        }

        fn wait_healthy(&self, component: &Component, instance: &Instance) -> Result<(), DriverError> {
            if self.healthy_now(component, instance) {
                Ok(())
            } else {
                Err(DriverError::Unhealthy(format!("{} is not healthy", instance.version)))
            }
        }

        fn healthy_now(&self, _: &Component, instance: &Instance) -> bool {
            !self.unhealthy.contains(&instance.version)
        }

        fn route(&mut self, _: &Component, upstreams: Vec<Upstream>) -> Result<(), DriverError> {
            let shown: Vec<String> = upstreams
                .iter()
                .map(|u| {
                    let slot = self.running.iter().find(|i| i.addr.as_ref() == Some(&u.addr)).map_or("?", |i| &i.slot);
                    format!("{slot}x{}", u.weight)
                })
                .collect();
            self.log.borrow_mut().push(format!("route {}", shown.join(",")));
            self.routed = upstreams;
            Ok(())
        }

        fn recreate_address(&self, _: &Component, previous: Option<&str>) -> Result<Option<String>, DriverError> {
            Ok(Some(previous.unwrap_or("127.0.0.1:7000").to_owned()))
        }
    }

    fn component(strategy: Strategy, instances: u32) -> Component {
        Component {
            name: "api".into(),
            driver: DriverSpec::Process(ProcessSpec {
                run: vec!["api".into(), "{addr}".into()],
                env: std::collections::BTreeMap::new(),
                serve: Some("127.0.0.1:1".into()),
            }),
            strategy,
            health: Some(Health {
                probe: Probe::Tcp,
                interval: Duration::from_millis(1),
                timeout: Duration::from_millis(1),
                healthy_after: 1,
                deadline: Duration::from_millis(1),
            }),
            drain: Duration::ZERO,
            instances,
            steps: vec![50, 100],
            step_interval: Duration::ZERO,
            max_error_rate: None,
            max_p99_ms: Some(100),
            rollback: upshift_core::manifest::RollbackPolicy::Always,
        }
    }

    fn log(fake: &Fake) -> Vec<String> {
        fake.log.borrow_mut().drain(..).collect()
    }

    #[test]
    fn blue_green_alternates_slots_and_switches_once_healthy() {
        let (mut fake, api) = (Fake::default(), component(Strategy::BlueGreen, 1));
        deploy(&mut fake, &api, "1.0.0", &|_| {}).unwrap();
        assert_eq!(log(&fake), ["start blue 1.0.0", "route bluex1"]);
        deploy(&mut fake, &api, "2.0.0", &|_| {}).unwrap();
        assert_eq!(log(&fake), ["start green 2.0.0", "route greenx1", "stop blue"]);
        // 3.0.0 fails its health check: the proxy never sees it, 2.0.0 keeps serving, and
        // putting 2.0.0 back only stops the failed one.
        fake.unhealthy.insert("3.0.0".into());
        assert!(matches!(deploy(&mut fake, &api, "3.0.0", &|_| {}), Err(DriverError::Unhealthy(_))));
        assert_eq!(log(&fake), ["start blue 3.0.0"]);
        let previous = Deployed::new("2.0.0", &api, serde_json::json!({}));
        put_back(&mut fake, &api, Some(&previous)).unwrap();
        assert_eq!(log(&fake), ["stop blue"]);
        // Again: a no-op.
        put_back(&mut fake, &api, Some(&previous)).unwrap();
        assert!(log(&fake).is_empty());
    }

    #[test]
    fn rolling_replaces_one_instance_at_a_time() {
        let (mut fake, api) = (Fake::default(), component(Strategy::Rolling, 2));
        deploy(&mut fake, &api, "1.0.0", &|_| {}).unwrap();
        log(&fake);
        deploy(&mut fake, &api, "2.0.0", &|_| {}).unwrap();
        assert_eq!(
            log(&fake),
            [
                "start 2.0.0#0 2.0.0",
                "route 1.0.0#1x1,2.0.0#0x1",
                "stop 1.0.0#0",
                "start 2.0.0#1 2.0.0",
                "route 2.0.0#0x1,2.0.0#1x1",
                "stop 1.0.0#1",
                "route 2.0.0#0x1,2.0.0#1x1"
            ]
        );
    }

    #[test]
    fn nothing_to_put_back_stops_everything() {
        let (mut fake, api) = (Fake::default(), component(Strategy::Rolling, 2));
        deploy(&mut fake, &api, "1.0.0", &|_| {}).unwrap();
        log(&fake);
        put_back(&mut fake, &api, None).unwrap();
        assert_eq!(log(&fake), ["route ", "stop 1.0.0#0", "stop 1.0.0#1"]);
        assert!(fake.running.is_empty() && fake.routed.is_empty());
    }

    #[test]
    fn recreate_reuses_the_address_and_put_back_is_a_no_op_when_back() {
        let (mut fake, api) = (Fake::default(), component(Strategy::Recreate, 1));
        deploy(&mut fake, &api, "1.0.0", &|_| {}).unwrap();
        deploy(&mut fake, &api, "2.0.0", &|_| {}).unwrap();
        assert_eq!(log(&fake), ["start live 1.0.0", "stop live", "start live 2.0.0"]);
        assert_eq!(fake.running[0].addr.as_deref(), Some("127.0.0.1:7000"));
        let previous = Deployed::new("1.0.0", &api, serde_json::json!({ "addr": "127.0.0.1:7000" }));
        put_back(&mut fake, &api, Some(&previous)).unwrap();
        put_back(&mut fake, &api, Some(&previous)).unwrap();
        assert_eq!(log(&fake), ["stop live", "start live 1.0.0"]);
    }

    fn window(requests: u64, errors: u64, p99_ms: Option<f64>) -> RouteStatus {
        RouteStatus {
            listen: "127.0.0.1:1".into(),
            upstreams: Vec::new(),
            versions: vec![VersionStatus {
                version: "2.0.0".into(),
                share: 50.0,
                window: Window { seconds: 1.0, requests, errors, p99_ms },
            }],
        }
    }

    #[test]
    fn a_canary_step_needs_traffic_and_stays_under_its_limits() {
        let api = component(Strategy::Canary, 1);
        let verdict = |route: RouteStatus| judge(&api, "2.0.0", 50, Some(&route));
        assert!(verdict(window(19, 0, Some(1.0))).unwrap_err().contains("too little traffic"));
        assert!(verdict(window(100, 2, Some(1.0))).unwrap_err().contains("error rate 2.0% is over"));
        assert!(verdict(window(100, 1, Some(150.0))).unwrap_err().contains("p99 150.0 ms is over max_p99_ms 100"));
        assert!(verdict(window(100, 1, Some(10.0))).unwrap().ends_with("passed"));
        assert!(judge(&api, "2.0.0", 50, None).unwrap_err().contains("0 requests"));
    }
}
