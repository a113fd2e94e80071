//! The Kubernetes driver: a component is an existing Deployment whose container image
//! upshift changes, through the API server (kube-rs), with the configuration `kubectl`
//! uses (the kubeconfig's current context, or `context`; in a pod, the service account).
//!
//! Only apps/v1 and core/v1 fields that Kubernetes 1.20 serves are used.
//!
//! - `rolling` (the default for this driver) sets the Deployment's strategy to
//!   `RollingUpdate` with `maxUnavailable: 0` and `maxSurge: 1`: no pod is taken away
//!   before its replacement is available. `recreate` sets the Recreate strategy.
//! - The new version goes into the pod template: the container's image (`image` with
//!   `{version}`) and the annotation `upshift.dev/version`, in one update of the whole
//!   object (optimistic concurrency on its resourceVersion).
//! - The rollout is followed through a watch on the Deployment, with `kubectl rollout
//!   status` semantics: the controller observed the new generation, every replica is
//!   updated, no old replica is left, every updated replica is available; a Progressing
//!   condition with reason `ProgressDeadlineExceeded` fails it.
//! - What ran is journaled as the Deployment's pod template, strategy and replica count
//!   (`Deployed.detail`), and an undo or rollback puts exactly that back: never the
//!   `ReplicaSet` history, which someone else may have changed.

use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use serde_json::json;
use upshift_core::Manifest;
use upshift_core::driver::{ComponentStatus, Deployed, Driver, DriverError, InstanceStatus};
use upshift_core::manifest::{Component, DriverKind, DriverSpec, Strategy};

/// The pod template annotation that names the version a Deployment runs.
pub(crate) const VERSION_ANNOTATION: &str = "upshift.dev/version";

fn refused(message: impl Into<String>) -> DriverError {
    DriverError::Refused(message.into())
}

fn unavailable(e: &kube::Error) -> DriverError {
    DriverError::Unavailable(format!("the Kubernetes API: {e}"))
}

/// The Kubernetes settings of a component.
#[derive(Clone)]
struct Target {
    namespace: Option<String>,
    deployment: String,
    container: Option<String>,
    image: String,
    context: Option<String>,
    /// The Service whose selector blue-green switches.
    service: Option<String>,
    /// `manifests`: the files of objects applied server-side (none: the image is set).
    manifests: Vec<String>,
}

impl Target {
    /// The same settings for another Deployment (a blue-green slot).
    fn named(&self, deployment: &str) -> Target {
        Target { deployment: deployment.to_owned(), ..self.clone() }
    }

    /// The Deployment of a blue-green slot: `blue` is the component's own Deployment,
    /// `green` its copy `<deployment>-green`.
    fn slot(&self, slot: &str) -> String {
        if slot == GREEN { format!("{}-green", self.deployment) } else { self.deployment.clone() }
    }

    /// The canary's Deployment: `<deployment>-canary`.
    fn canary(&self) -> String {
        format!("{}-canary", self.deployment)
    }
}

/// The pod label of the canary's pods (`canary`), beside the Deployment's own labels, so
/// the Service in front of the Deployment sends them their share of requests.
const TRACK_LABEL: &str = "upshift.dev/track";
/// The canary Deployment's annotation with the replica count the two Deployments share,
/// so a canary resumed after a crash splits the same total.
const TOTAL_ANNOTATION: &str = "upshift.dev/replicas";

/// The pod label and Service selector key of a blue-green slot.
const SLOT_LABEL: &str = "upshift.dev/slot";
const BLUE: &str = "blue";
const GREEN: &str = "green";

/// Runs components as Kubernetes Deployments.
pub struct KubernetesDriver {
    manifest: Manifest,
    runtime: tokio::runtime::Runtime,
    /// Clients by kubeconfig context (`None`: the current one), made on first use.
    clients: Vec<(Option<String>, kube::Client)>,
}

/// Where a rollout stands, as `kubectl rollout status` reads it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Every replica runs the new template and is available.
    Done,
    /// Still going, and why.
    Waiting(String),
    /// It will not finish: the progress deadline passed.
    Failed(String),
}

/// Whether a Deployment's Progressing condition says its deadline passed (whichever
/// generation the controller has seen).
fn timed_out(deployment: &Deployment) -> bool {
    deployment
        .status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
}

/// Reads a Deployment's rollout like `kubectl rollout status`.
pub(crate) fn progress(deployment: &Deployment) -> Progress {
    let name = deployment.metadata.name.as_deref().unwrap_or("deployment");
    let generation = deployment.metadata.generation.unwrap_or(0);
    let Some(status) = &deployment.status else { return Progress::Waiting("no status yet".into()) };
    if status.observed_generation.unwrap_or(0) < generation {
        return Progress::Waiting(format!("waiting for the controller to see {name}'s new spec"));
    }
    let failed = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
    if let Some(condition) = failed {
        return Progress::Failed(format!(
            "{name} exceeded its progress deadline: {}",
            condition.message.as_deref().unwrap_or("no progress")
        ));
    }
    let wanted = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let updated = status.updated_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    if updated < wanted {
        return Progress::Waiting(format!("{updated} of {wanted} replicas updated"));
    }
    if total > updated {
        return Progress::Waiting(format!("{} old replicas are pending termination", total - updated));
    }
    if available < updated {
        return Progress::Waiting(format!("{available} of {updated} updated replicas available"));
    }
    Progress::Done
}

/// The version a pod template runs: its annotation, else its container's image tag.
fn template_version(template: &PodTemplateSpec, container: Option<&str>) -> Option<String> {
    let annotated =
        template.metadata.as_ref().and_then(|m| m.annotations.as_ref()).and_then(|a| a.get(VERSION_ANNOTATION));
    if let Some(version) = annotated {
        return Some(version.clone());
    }
    let spec = template.spec.as_ref()?;
    let image = spec.containers.iter().find(|c| container.is_none_or(|n| c.name == n))?.image.as_deref()?;
    Some(image.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')).map_or(image, |(_, tag)| tag).to_owned())
}

/// A client made like `kubectl` makes one: the kubeconfig's `context` (or its current
/// context), else the pod's service account.
pub(crate) async fn connect(context: Option<&str>) -> Result<kube::Client, DriverError> {
    let options = kube::config::KubeConfigOptions { context: context.map(str::to_owned), ..Default::default() };
    let config = match &options.context {
        Some(_) => kube::Config::from_kubeconfig(&options).await.map_err(|e| e.to_string()),
        None => kube::Config::infer().await.map_err(|e| e.to_string()),
    };
    config.and_then(|config| kube::Client::try_from(config).map_err(|e| e.to_string())).map_err(|e| {
        DriverError::Unavailable(format!(
            "no Kubernetes configuration ({e}); set KUBECONFIG or run where `kubectl` works"
        ))
    })
}

impl KubernetesDriver {
    /// A driver for the manifest's Kubernetes components; nothing is contacted yet.
    pub fn new(manifest: &Manifest) -> Result<KubernetesDriver, DriverError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| refused(format!("starting the Kubernetes client's runtime: {e}")))?;
        Ok(KubernetesDriver { manifest: manifest.clone(), runtime, clients: Vec::new() })
    }

    fn target(&self, component: &Component) -> Result<Target, DriverError> {
        let DriverSpec::Kubernetes { namespace, deployment, container, image, context, service, manifests } =
            &component.driver
        else {
            return Err(refused(format!("component {} does not use the kubernetes driver", component.name)));
        };
        let expand = |text: &String| self.manifest.expand(text).map_err(refused);
        Ok(Target {
            namespace: namespace.as_ref().map(expand).transpose()?,
            deployment: expand(deployment)?,
            container: container.as_ref().map(expand).transpose()?,
            image: image.as_ref().map(expand).transpose()?.unwrap_or_default(),
            context: context.as_ref().map(expand).transpose()?,
            service: service.as_ref().map(expand).transpose()?,
            manifests: manifests.iter().map(expand).collect::<Result<_, _>>()?,
        })
    }

    /// The client of a context, made like `kubectl` makes it.
    fn client(&mut self, context: Option<&String>) -> Result<kube::Client, DriverError> {
        if let Some((_, client)) = self.clients.iter().find(|(c, _)| c.as_ref() == context) {
            return Ok(client.clone());
        }
        let client = self.runtime.block_on(connect(context.map(String::as_str)))?;
        self.clients.push((context.cloned(), client.clone()));
        Ok(client)
    }

    /// The Deployments API of the component's namespace (the context's own by default).
    fn api(&mut self, target: &Target) -> Result<(Api<Deployment>, String), DriverError> {
        let client = self.client(target.context.as_ref())?;
        let namespace = target.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
        Ok((Api::namespaced(client, &namespace), namespace))
    }

    /// The Deployment, which must exist: upshift changes it, it does not create it.
    fn deployment(&mut self, target: &Target) -> Result<(Api<Deployment>, Deployment), DriverError> {
        let (api, namespace) = self.api(target)?;
        match self.runtime.block_on(api.get(&target.deployment)) {
            Ok(deployment) => Ok((api, deployment)),
            Err(kube::Error::Api(status)) if status.code == 404 => Err(refused(format!(
                "deployment {} does not exist in namespace {namespace}: create it first (upshift changes a \
                 Deployment's image; it does not create the Deployment)",
                target.deployment
            ))),
            Err(e) => Err(unavailable(&e)),
        }
    }

    /// Updates the Deployment with `change` (retried on a conflict with another writer),
    /// then follows its rollout to the end.
    fn update(
        &mut self,
        target: &Target,
        change: &dyn Fn(&mut Deployment) -> Result<(), DriverError>,
        say: &dyn Fn(&str),
    ) -> Result<(), DriverError> {
        let mut attempts = 0;
        let (api, updated, timed_out_before) = loop {
            let (api, mut deployment) = self.deployment(target)?;
            let timed_out = matches!(progress(&deployment), Progress::Failed(_));
            change(&mut deployment)?;
            match self.runtime.block_on(api.replace(&target.deployment, &PostParams::default(), &deployment)) {
                Ok(updated) => break (api, updated, timed_out),
                Err(kube::Error::Api(status)) if status.code == 409 && attempts < 5 => attempts += 1,
                Err(e) => return Err(unavailable(&e)),
            }
        };
        self.follow(&api, updated, timed_out_before, say)
    }

    /// Follows a rollout through a watch on the Deployment until it is done or fails.
    ///
    /// `timed_out_before`: the Deployment had already exceeded its progress deadline before
    /// this rollout (an earlier one got stuck). The controller keeps that condition, naming
    /// the new `ReplicaSet`, until the new rollout makes progress, so it is not this
    /// rollout's failure until a progress deadline has passed since it began.
    fn follow(
        &mut self,
        api: &Api<Deployment>,
        mut deployment: Deployment,
        mut timed_out_before: bool,
        say: &dyn Fn(&str),
    ) -> Result<(), DriverError> {
        let name = deployment.metadata.name.clone().unwrap_or_default();
        // The controller flags a stuck rollout at its deadline; a little more, then give up.
        let deadline_s = deployment.spec.as_ref().and_then(|s| s.progress_deadline_seconds).unwrap_or(600);
        let limit = Duration::from_secs(u64::try_from(deadline_s).unwrap_or(600) + 30);
        let started = std::time::Instant::now();
        let mut last = String::new();
        let deadline = Duration::from_secs(u64::try_from(deadline_s).unwrap_or(600));
        loop {
            let now = progress(&deployment);
            // The old condition is gone once the controller has written another one.
            if timed_out_before && !timed_out(&deployment) {
                timed_out_before = false;
            }
            match now {
                Progress::Done => return Ok(()),
                Progress::Failed(why) if !timed_out_before || started.elapsed() >= deadline => {
                    return Err(DriverError::Unhealthy(why));
                }
                Progress::Failed(_) => {
                    let why = "waiting for progress (an earlier rollout had exceeded the deadline)".to_owned();
                    if why != last {
                        say(&format!("  {name}: {why}"));
                        last = why;
                    }
                }
                Progress::Waiting(why) => {
                    if why != last {
                        say(&format!("  {name}: {why}"));
                        last = why;
                    }
                }
            }
            let left = limit.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(DriverError::Unhealthy(format!(
                    "{name}: the rollout did not finish within {}s",
                    limit.as_secs()
                )));
            }
            let version = deployment.metadata.resource_version.clone().unwrap_or_default();
            let params = WatchParams::default()
                .fields(&format!("metadata.name={name}"))
                .timeout(u32::try_from(left.as_secs().clamp(1, 290)).unwrap_or(290));
            let next = self.runtime.block_on(async {
                let stream = api.watch(&params, &version).await?;
                let mut stream = stream.boxed();
                while let Some(event) = stream.try_next().await? {
                    match event {
                        WatchEvent::Added(d) | WatchEvent::Modified(d) => return Ok(Some(d)),
                        WatchEvent::Deleted(_) => return Ok(None),
                        WatchEvent::Bookmark(_) => {}
                        WatchEvent::Error(status) if status.code == 410 => break,
                        WatchEvent::Error(status) => return Err(kube::Error::Api(status)),
                    }
                }
                // The watch ended (its timeout, or an expired version): read the object again.
                api.get(&name).await.map(Some)
            });
            deployment = match next {
                Ok(Some(d)) => d,
                Ok(None) => return Err(refused(format!("deployment {name} was deleted during the rollout"))),
                Err(e) => return Err(unavailable(&e)),
            };
        }
    }

    /// The Services API of the component's namespace.
    fn services(&mut self, target: &Target) -> Result<Api<Service>, DriverError> {
        let client = self.client(target.context.as_ref())?;
        let namespace = target.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
        Ok(Api::namespaced(client, &namespace))
    }

    /// The slot the Service selects, if it selects one yet.
    fn live_slot(&mut self, target: &Target, service: &str) -> Result<Option<String>, DriverError> {
        let services = self.services(target)?;
        let found = match self.runtime.block_on(services.get(service)) {
            Ok(found) => found,
            Err(kube::Error::Api(status)) if status.code == 404 => {
                return Err(refused(format!("service {service} does not exist: blue-green switches its selector")));
            }
            Err(e) => return Err(unavailable(&e)),
        };
        Ok(found.spec.and_then(|s| s.selector).and_then(|mut s| s.remove(SLOT_LABEL)))
    }

    /// Points the Service at `slot` (one merge patch of its selector; `None` takes the slot
    /// out of it again).
    fn select(&mut self, target: &Target, service: &str, slot: Option<&str>) -> Result<(), DriverError> {
        let services = self.services(target)?;
        let patch = json!({ "spec": { "selector": { SLOT_LABEL: slot } } });
        self.runtime
            .block_on(services.patch(service, &PatchParams::default(), &Patch::Merge(&patch)))
            .map(drop)
            .map_err(|e| unavailable(&e))
    }

    /// A Deployment, or none.
    fn find(&mut self, target: &Target, name: &str) -> Result<Option<Deployment>, DriverError> {
        match self.deployment(&target.named(name)) {
            Ok((_, deployment)) => Ok(Some(deployment)),
            Err(DriverError::Refused(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Scales a slot's Deployment to zero, when it exists.
    fn scale_to_zero(&mut self, target: &Target, name: &str) -> Result<(), DriverError> {
        if self.find(target, name)?.is_none() {
            return Ok(());
        }
        self.update(
            &target.named(name),
            &|d| {
                d.spec.get_or_insert_with(Default::default).replicas = Some(0);
                Ok(())
            },
            &|_| {},
        )
    }

    /// Blue-green: the new version in the other slot's Deployment, waited ready, then the
    /// Service's selector switched to it in one patch, the old slot drained and scaled to
    /// zero. The first time, the component's own Deployment becomes slot blue: its pods get
    /// the slot label (a rolling restart with no replica unavailable), then the Service
    /// selects them.
    fn deploy_blue_green(
        &mut self,
        target: &Target,
        component: &Component,
        version: &str,
        say: &dyn Fn(&str),
    ) -> Result<(), DriverError> {
        let service = target.service.clone().ok_or_else(|| refused("blue-green needs `service`"))?;
        let live = if let Some(live) = self.live_slot(target, &service)? {
            live
        } else {
            say(&format!("  {}: becomes slot blue; the Service {service} then selects it", target.deployment));
            self.update(
                target,
                &|d| {
                    label_slot(d, BLUE);
                    Ok(())
                },
                say,
            )?;
            self.select(target, &service, Some(BLUE))?;
            BLUE.to_owned()
        };
        let next = if live == BLUE { GREEN } else { BLUE };
        let (live_name, next_name) = (target.slot(&live), target.slot(next));
        let replicas = self.find(target, &live_name)?.and_then(|d| d.spec.and_then(|s| s.replicas)).unwrap_or(1);
        let ready = |d: &mut Deployment| {
            label_slot(d, next);
            set_version(d, target, component, version)?;
            d.spec.get_or_insert_with(Default::default).replicas = Some(replicas);
            Ok(())
        };
        if self.find(target, &next_name)?.is_some() {
            self.update(&target.named(&next_name), &ready, say)?;
        } else {
            // The slot's Deployment: a copy of the component's own, under its slot label.
            let (api, own) = self.deployment(target)?;
            let mut copy = copy_of(&own, &next_name, (SLOT_LABEL, next));
            ready(&mut copy)?;
            let created =
                self.runtime.block_on(api.create(&PostParams::default(), &copy)).map_err(|e| unavailable(&e))?;
            self.follow(&api, created, false, say)?;
        }
        self.select(target, &service, Some(next))?;
        say(&format!("  {service}: selects slot {next} ({version}); {live} drains for {}s", component.drain.as_secs()));
        std::thread::sleep(component.drain);
        self.scale_to_zero(target, &live_name)
    }

    /// Puts a blue-green component back: the recorded slot's Deployment gets its recorded
    /// template and replicas, the Service selects it, the other slot goes to zero. A record
    /// from before blue-green (no slot) gets the Service's selector back as it was.
    fn put_back_blue_green(&mut self, target: &Target, previous: &Deployed) -> Result<(), DriverError> {
        let service = target.service.clone().ok_or_else(|| refused("blue-green needs `service`"))?;
        let slot = previous.detail["slot"].as_str().map(str::to_owned);
        let back = slot.as_deref().unwrap_or(BLUE);
        let other = if back == BLUE { GREEN } else { BLUE };
        self.put_back_template(&target.named(&target.slot(back)), previous)?;
        self.select(target, &service, slot.as_deref())?;
        self.scale_to_zero(target, &target.slot(other))
    }

    /// The recorded pod template, strategy and replicas back on one Deployment (a no-op
    /// when they are there and its rollout is complete).
    fn put_back_template(&mut self, target: &Target, previous: &Deployed) -> Result<(), DriverError> {
        let template: PodTemplateSpec = serde_json::from_value(previous.detail["template"].clone())
            .map_err(|e| refused(format!("the journal's record of {} has no pod template: {e}", target.deployment)))?;
        let strategy: Option<DeploymentStrategy> =
            serde_json::from_value(previous.detail["strategy"].clone()).unwrap_or(None);
        let replicas: Option<i32> = serde_json::from_value(previous.detail["replicas"].clone()).unwrap_or(None);
        let (_, now) = self.deployment(target)?;
        let same = now.spec.as_ref().is_some_and(|s| s.template == template && s.replicas == replicas);
        if same && progress(&now) == Progress::Done {
            return Ok(());
        }
        self.update(
            target,
            &|d| {
                let spec = d.spec.get_or_insert_with(Default::default);
                spec.template = template.clone();
                spec.strategy.clone_from(&strategy);
                spec.replicas = replicas;
                Ok(())
            },
            &|_| {},
        )
    }

    /// Canary by replica share: a copy of the Deployment, `<deployment>-canary`, runs the
    /// new version; at each step its replicas are that share of the total (at least one)
    /// and the Deployment gives up as many, so the Service in front of both sends it about
    /// that share of requests. Each step waits for the canary's rollout, then watches it
    /// for `step_interval`: a pod that is not ready or restarts fails it. At 100 % the
    /// Deployment itself rolls to the new version (no replica unavailable) and the canary
    /// goes to zero.
    fn deploy_canary(
        &mut self,
        target: &Target,
        component: &Component,
        version: &str,
        say: &dyn Fn(&str),
    ) -> Result<(), DriverError> {
        let (api, stable) = self.deployment(target)?;
        let name = target.canary();
        let existing = self.find(target, &name)?;
        // The total: what the canary recorded when a canary of this run is under way (a
        // resumed run), else the Deployment's own count.
        let in_flight = existing.as_ref().filter(|d| d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0) > 0);
        let total = in_flight
            .and_then(|d| d.metadata.annotations.as_ref()?.get(TOTAL_ANNOTATION)?.parse::<i32>().ok())
            .or_else(|| stable.spec.as_ref().and_then(|s| s.replicas))
            .unwrap_or(1)
            .max(1);
        let shape = |d: &mut Deployment, replicas: i32| {
            set_version(d, target, component, version)?;
            label_track(d);
            d.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(TOTAL_ANNOTATION.into(), total.to_string());
            d.spec.get_or_insert_with(Default::default).replicas = Some(replicas);
            Ok(())
        };
        for &share in component.steps.iter().filter(|&&s| s < 100) {
            let canaries = canary_replicas(total, share);
            if canaries >= total {
                break;
            }
            say(&format!("  canary at {share}%: {canaries} of {total} replicas run {version}"));
            if self.find(target, &name)?.is_some() {
                self.update(&target.named(&name), &|d| shape(d, canaries), say)?;
            } else {
                let mut copy = copy_of(&stable, &name, (TRACK_LABEL, "canary"));
                shape(&mut copy, canaries)?;
                let created =
                    self.runtime.block_on(api.create(&PostParams::default(), &copy)).map_err(|e| unavailable(&e))?;
                self.follow(&api, created, false, say)?;
            }
            self.update(
                target,
                &|d| {
                    d.spec.get_or_insert_with(Default::default).replicas = Some(total - canaries);
                    Ok(())
                },
                say,
            )?;
            self.judge_canary(target, &name, share, component.step_interval)?;
            say(&format!(
                "  canary at {share}%: every canary pod stayed ready for {}s",
                component.step_interval.as_secs()
            ));
            if let Some(prometheus) = &self.manifest.verify.prometheus {
                say(&format!("  canary at {share}%: {}", judge_prometheus(prometheus, component, version, share)?));
            }
        }
        say(&format!("  canary at 100%: {} rolls to {version}", target.deployment));
        self.update(
            target,
            &|d| {
                set_version(d, target, component, version)?;
                d.spec.get_or_insert_with(Default::default).replicas = Some(total);
                Ok(())
            },
            say,
        )?;
        self.scale_to_zero(target, &name)
    }

    /// Watches the canary's pods for `interval`: each one ready, none restarted since the
    /// step began, the Deployment's rollout not failed.
    fn judge_canary(&mut self, target: &Target, name: &str, share: u32, interval: Duration) -> Result<(), DriverError> {
        let until = std::time::Instant::now() + interval;
        let mut baseline: Option<Vec<(String, i32)>> = None;
        loop {
            let (_, canary) = self.deployment(&target.named(name))?;
            if let Progress::Failed(why) = progress(&canary) {
                return Err(DriverError::Unhealthy(format!("canary at {share}%: {why}")));
            }
            let pods = self.pods(target, &canary)?;
            let seen = baseline.get_or_insert_with(|| restarts(&pods));
            if let Some(why) = canary_verdict(&pods, seen) {
                return Err(DriverError::Unhealthy(format!("canary at {share}%: {why}")));
            }
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(Duration::from_secs(1)));
        }
    }

    /// The objects of the `manifests` files for `version`: each file (a `*` in its name
    /// matches any run of characters) read, `{version}` filled in, its YAML documents
    /// parsed; every Deployment's pod template gets the version annotation.
    fn render(&self, target: &Target, version: &str) -> Result<Vec<serde_json::Value>, DriverError> {
        let base = self.manifest.path.parent().unwrap_or(std::path::Path::new("."));
        let mut objects = Vec::new();
        for pattern in &target.manifests {
            for path in matching_files(&base.join(pattern))? {
                let text =
                    std::fs::read_to_string(&path).map_err(|e| refused(format!("reading {}: {e}", path.display())))?;
                let text = crate::process::fill(&text, version, None);
                let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
                    .map_err(|e| refused(format!("{}: not YAML of Kubernetes objects: {e}", path.display())))?;
                for mut object in documents.into_iter().filter(|d| !d.is_null()) {
                    let named = object["apiVersion"].is_string()
                        && object["kind"].is_string()
                        && object["metadata"]["name"].is_string();
                    if !named {
                        return Err(refused(format!(
                            "{}: every object needs apiVersion, kind and metadata.name",
                            path.display()
                        )));
                    }
                    if object["kind"] == "Deployment" {
                        object["spec"]["template"]["metadata"]["annotations"][VERSION_ANNOTATION] = json!(version);
                    }
                    objects.push(object);
                }
            }
        }
        Ok(objects)
    }

    /// The API of one object's kind (found by discovery) in its namespace, with the
    /// object's namespace filled in when its kind is namespaced.
    async fn object_api(
        client: &kube::Client,
        object: &mut serde_json::Value,
        namespace: &str,
    ) -> Result<Api<DynamicObject>, DriverError> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, object["kind"].as_str().unwrap_or_default());
        let (resource, capabilities) = kube::discovery::pinned_kind(client, &gvk)
            .await
            .map_err(|e| refused(format!("{} {}: the API server serves no such kind ({e})", api_version, gvk.kind)))?;
        Ok(if capabilities.scope == Scope::Namespaced {
            let namespace = object["metadata"]["namespace"].as_str().unwrap_or(namespace).to_owned();
            object["metadata"]["namespace"] = json!(namespace);
            Api::namespaced_with(client.clone(), &namespace, &resource)
        } else {
            Api::all_with(client.clone(), &resource)
        })
    }

    /// Applies `objects` server-side (field manager `upshift`, taking over fields other
    /// managers set), or only checks them with a server-side dry run.
    fn apply(&mut self, target: &Target, objects: &[serde_json::Value], dry_run: bool) -> Result<(), DriverError> {
        let (_, namespace) = self.api(target)?;
        let client = self.client(target.context.as_ref())?;
        let mut params = PatchParams::apply(FIELD_MANAGER).force();
        if dry_run {
            params = params.dry_run();
        }
        self.runtime.block_on(async {
            for object in objects {
                let mut object = object.clone();
                let api = Self::object_api(&client, &mut object, &namespace).await?;
                let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                api.patch(&name, &params, &Patch::Apply(&object)).await.map_err(|e| match e {
                    kube::Error::Api(status) => {
                        let kind = object["kind"].as_str().unwrap_or_default();
                        refused(format!("{kind} {name}: the API server refused it: {}", status.message))
                    }
                    e => unavailable(&e),
                })?;
            }
            Ok(())
        })
    }

    /// Applies the objects, then follows the rollout of every Deployment among them.
    fn apply_and_follow(
        &mut self,
        target: &Target,
        objects: &[serde_json::Value],
        say: &dyn Fn(&str),
    ) -> Result<(), DriverError> {
        let deployments: Vec<String> = objects
            .iter()
            .filter(|o| o["kind"] == "Deployment")
            .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_owned))
            .collect();
        let mut stuck_before = Vec::new();
        for name in &deployments {
            if let Some(d) = self.find(target, name)? {
                stuck_before.push((name.clone(), matches!(progress(&d), Progress::Failed(_))));
            }
        }
        self.apply(target, objects, false)?;
        for name in &deployments {
            let (api, deployment) = self.deployment(&target.named(name))?;
            let stuck = stuck_before.iter().any(|(n, stuck)| n == name && *stuck);
            self.follow(&api, deployment, stuck, say)?;
        }
        Ok(())
    }

    /// `manifests`: the files rendered for `version`, applied server-side, followed.
    fn deploy_manifests(&mut self, target: &Target, version: &str, say: &dyn Fn(&str)) -> Result<(), DriverError> {
        let objects = self.render(target, version)?;
        say(&format!("  applying {} object(s) server-side (field manager {FIELD_MANAGER})", objects.len()));
        self.apply_and_follow(target, &objects, say)
    }

    /// `manifests`: the objects as they were before, from the journal's record, applied
    /// again. An object the new version added is left as it is (upshift never deletes).
    fn put_back_objects(&mut self, target: &Target, previous: &Deployed) -> Result<(), DriverError> {
        let objects: Vec<serde_json::Value> = serde_json::from_value(previous.detail["objects"].clone())
            .map_err(|e| refused(format!("the journal's record of {} has no objects: {e}", target.deployment)))?;
        self.apply_and_follow(target, &objects, &|_| {})
    }

    /// The live state of the objects the files name (rendered for the running `version`),
    /// without what the server owns (status, uid, resourceVersion, managedFields, ...), so
    /// applying it again puts that state back. Objects that do not exist are left out.
    fn live_objects(&mut self, target: &Target, version: &str) -> Result<Vec<serde_json::Value>, DriverError> {
        let objects = self.render(target, version)?;
        let (_, namespace) = self.api(target)?;
        let client = self.client(target.context.as_ref())?;
        self.runtime.block_on(async {
            let mut live = Vec::new();
            for mut object in objects {
                let api = Self::object_api(&client, &mut object, &namespace).await?;
                let name = object["metadata"]["name"].as_str().unwrap_or_default();
                match api.get_opt(name).await {
                    Ok(Some(found)) => live.push(applicable(&found)),
                    Ok(None) => {}
                    Err(e) => return Err(unavailable(&e)),
                }
            }
            Ok(live)
        })
    }

    /// The pods of a Deployment (by its selector).
    fn pods(&mut self, target: &Target, deployment: &Deployment) -> Result<Vec<Pod>, DriverError> {
        let (_, namespace) = self.api(target)?;
        let client = self.client(target.context.as_ref())?;
        let selector = deployment
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.as_ref())
            .map(|labels| labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
            .unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(client, &namespace);
        self.runtime
            .block_on(pods.list(&ListParams::default().labels(&selector)))
            .map(|list| list.items)
            .map_err(|e| unavailable(&e))
    }
}

/// Sets the new version into a Deployment: image, annotation, and the strategy.
fn set_version(
    deployment: &mut Deployment,
    target: &Target,
    component: &Component,
    version: &str,
) -> Result<(), DriverError> {
    let image = crate::process::fill(&target.image, version, None);
    let spec = deployment.spec.get_or_insert_with(Default::default);
    let pod = spec.template.spec.get_or_insert_with(Default::default);
    let names: Vec<String> = pod.containers.iter().map(|c| c.name.clone()).collect();
    let container = match &target.container {
        Some(name) => pod.containers.iter_mut().find(|c| &c.name == name).ok_or_else(|| {
            refused(format!("deployment {} has no container {name} (it has {})", target.deployment, names.join(", ")))
        })?,
        None => pod
            .containers
            .first_mut()
            .ok_or_else(|| refused(format!("deployment {} has no container", target.deployment)))?,
    };
    container.image = Some(image);
    spec.template
        .metadata
        .get_or_insert_with(Default::default)
        .annotations
        .get_or_insert_with(Default::default)
        .insert(VERSION_ANNOTATION.to_owned(), version.to_owned());
    spec.strategy = Some(match component.strategy {
        Strategy::Recreate => DeploymentStrategy { type_: Some("Recreate".into()), rolling_update: None },
        _ => DeploymentStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateDeployment {
                max_unavailable: Some(IntOrString::Int(0)),
                max_surge: Some(IntOrString::Int(1)),
            }),
        },
    });
    Ok(())
}

/// Puts a Deployment's pods under a blue-green slot label.
fn label_slot(deployment: &mut Deployment, slot: &str) {
    let spec = deployment.spec.get_or_insert_with(Default::default);
    spec.template
        .metadata
        .get_or_insert_with(Default::default)
        .labels
        .get_or_insert_with(Default::default)
        .insert(SLOT_LABEL.to_owned(), slot.to_owned());
}

/// The field manager of upshift's server-side applies.
const FIELD_MANAGER: &str = "upshift";

/// The files `pattern` names: itself, or with a `*` in its file name, every file of its
/// folder that matches, sorted. A pattern that matches nothing is an error.
fn matching_files(pattern: &std::path::Path) -> Result<Vec<std::path::PathBuf>, DriverError> {
    let name = pattern.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let Some((prefix, suffix)) = name.split_once('*') else {
        return Ok(vec![pattern.to_path_buf()]);
    };
    let folder = pattern.parent().unwrap_or(std::path::Path::new("."));
    let entries =
        std::fs::read_dir(folder).map_err(|e| refused(format!("`manifests`: reading {}: {e}", folder.display())))?;
    let mut found: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() >= prefix.len() + suffix.len() && n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(refused(format!("`manifests`: no file matches {}", pattern.display())));
    }
    Ok(found)
}

/// An object as the server returned it, as something to apply again: the fields the
/// server or its controllers own are dropped.
fn applicable(found: &DynamicObject) -> serde_json::Value {
    let mut object = serde_json::to_value(found).unwrap_or_default();
    if let Some(map) = object.as_object_mut() {
        map.remove("status");
    }
    if let Some(metadata) = object["metadata"].as_object_mut() {
        for key in ["managedFields", "resourceVersion", "uid", "creationTimestamp", "generation", "selfLink"] {
            metadata.remove(key);
        }
        if let Some(annotations) = metadata.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            annotations.remove("deployment.kubernetes.io/revision");
            annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
    object
}

/// A new Deployment `name` made from `source`: its labels and spec, with `label` added to
/// its selector (the caller labels the pod template), nothing the server set.
fn copy_of(source: &Deployment, name: &str, (key, value): (&str, &str)) -> Deployment {
    let mut copy = Deployment {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: source.metadata.namespace.clone(),
            labels: source.metadata.labels.clone(),
            ..Default::default()
        },
        spec: source.spec.clone(),
        status: None,
    };
    let spec = copy.spec.get_or_insert_with(Default::default);
    spec.selector.match_labels.get_or_insert_with(Default::default).insert(key.to_owned(), value.to_owned());
    copy
}

/// Puts a Deployment's pods on the canary track.
fn label_track(deployment: &mut Deployment) {
    let spec = deployment.spec.get_or_insert_with(Default::default);
    spec.template
        .metadata
        .get_or_insert_with(Default::default)
        .labels
        .get_or_insert_with(Default::default)
        .insert(TRACK_LABEL.to_owned(), "canary".to_owned());
}

/// A canary step's verdict from `[verify] prometheus`: each query (with `{version}`) asked
/// once, at the end of the step, and judged with the process driver's rule
/// ([`upshift_core::driver::rate_limits_broken`]). A query with no data does not pass: too
/// little traffic to judge, as with the proxy's figures.
fn judge_prometheus(
    prometheus: &upshift_core::manifest::Prometheus,
    component: &Component,
    version: &str,
    share: u32,
) -> Result<String, DriverError> {
    let ask = |what: &str, query: Option<&String>| -> Result<Option<f64>, DriverError> {
        let Some(query) = query else { return Ok(None) };
        let query = crate::process::fill(query, version, None);
        match upshift_core::prometheus::query(&prometheus.url, &query, Duration::from_secs(10)) {
            Ok(Some(value)) => Ok(Some(value)),
            Ok(None) => Err(DriverError::Unhealthy(format!(
                "canary at {share}%: the {what} query returned no data, so the step cannot be judged: {query}"
            ))),
            Err(e) => Err(DriverError::Unavailable(format!("canary at {share}%: the {what} query: {e}"))),
        }
    };
    let error_rate = ask("error_rate", prometheus.error_rate.as_ref())?;
    let p99 = ask("p99_ms", prometheus.p99_ms.as_ref())?;
    if let Some(why) = upshift_core::driver::rate_limits_broken(component, error_rate, p99) {
        return Err(DriverError::Unhealthy(format!("canary at {share}%: {why} (Prometheus)")));
    }
    let figures: Vec<String> =
        [error_rate.map(|r| format!("error rate {:.1}%", r * 100.0)), p99.map(|p| format!("p99 {p:.1} ms"))]
            .into_iter()
            .flatten()
            .collect();
    Ok(format!("Prometheus says {}", figures.join(", ")))
}

/// The canary's replicas at `share` percent of `total`: rounded up, at least one.
fn canary_replicas(total: i32, share: u32) -> i32 {
    let share = i32::try_from(share).unwrap_or(100);
    ((total * share + 99) / 100).max(1)
}

/// A pod's restarts, all its containers together.
fn pod_restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |c| c.iter().map(|c| c.restart_count).sum())
}

/// Each pod's restarts, by name.
fn restarts(pods: &[Pod]) -> Vec<(String, i32)> {
    pods.iter().map(|pod| (pod.metadata.name.clone().unwrap_or_default(), pod_restarts(pod))).collect()
}

/// Why the canary's pods fail a step, if they do: one is not ready (or gone to a failed
/// phase), or restarted since the step began (`before`: the restarts then; a pod that came
/// since is judged from zero).
fn canary_verdict(pods: &[Pod], before: &[(String, i32)]) -> Option<String> {
    for pod in pods.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
        let name = pod.metadata.name.as_deref().unwrap_or("pod");
        let status = pod.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if !ready {
            let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
            return Some(format!("pod {name} is not ready ({phase})"));
        }
        let (count, was) = (pod_restarts(pod), before.iter().find(|(n, _)| n == name).map_or(0, |(_, c)| *c));
        if count > was {
            return Some(format!("pod {name} restarted ({count} restarts, {was} when the step began)"));
        }
    }
    None
}

impl Driver for KubernetesDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Kubernetes
    }

    fn current(&mut self, component: &Component) -> Result<Option<Deployed>, DriverError> {
        let mut target = self.target(component)?;
        // Under blue-green, what runs is the slot the Service selects.
        let slot = match target.service.clone() {
            Some(service) => self.live_slot(&target, &service)?,
            None => None,
        };
        if let Some(slot) = &slot {
            target = target.named(&target.slot(slot));
        }
        let (_, deployment) = match self.deployment(&target) {
            Ok(found) => found,
            Err(DriverError::Refused(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(spec) = &deployment.spec else { return Ok(None) };
        let Some(version) = template_version(&spec.template, target.container.as_deref()) else { return Ok(None) };
        let mut detail = json!({
            "template": spec.template,
            "strategy": spec.strategy,
            "replicas": spec.replicas,
        });
        if let Some(slot) = slot {
            detail["slot"] = json!(slot);
        }
        if !target.manifests.is_empty() {
            detail["objects"] = json!(self.live_objects(&target, &version)?);
        }
        let deployed = Deployed::new(&version, component, detail);
        // Without upshift's annotation, someone else applied it: a first deploy takes it over.
        let annotated = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .is_some_and(|a| a.contains_key(VERSION_ANNOTATION));
        Ok(Some(if annotated { deployed } else { deployed.adopted() }))
    }

    fn deploy(&mut self, component: &Component, version: &str, say: &dyn Fn(&str)) -> Result<(), DriverError> {
        let target = self.target(component)?;
        if !target.manifests.is_empty() {
            return self.deploy_manifests(&target, version, say);
        }
        match component.strategy {
            Strategy::BlueGreen => self.deploy_blue_green(&target, component, version, say),
            Strategy::Canary => self.deploy_canary(&target, component, version, say),
            _ => self.update(&target, &|d| set_version(d, &target, component, version), say),
        }
    }

    fn put_back(&mut self, component: &Component, previous: Option<&Deployed>) -> Result<(), DriverError> {
        let target = self.target(component)?;
        // Nothing to put back (or the runner stops the component while it restores the
        // database): scaled to zero, the Deployment kept; upshift never deletes it.
        let Some(previous) = previous else {
            if let Some(service) = target.service.clone() {
                let live = self.live_slot(&target, &service)?.unwrap_or_else(|| BLUE.to_owned());
                return self.scale_to_zero(&target, &target.slot(&live));
            }
            if component.strategy == Strategy::Canary {
                self.scale_to_zero(&target, &target.canary())?;
            }
            return self.scale_to_zero(&target, &target.deployment);
        };
        if !target.manifests.is_empty() && previous.detail.get("objects").is_some() {
            return self.put_back_objects(&target, previous);
        }
        match component.strategy {
            Strategy::BlueGreen => self.put_back_blue_green(&target, previous),
            Strategy::Canary => {
                self.put_back_template(&target, previous)?;
                self.scale_to_zero(&target, &target.canary())
            }
            _ => self.put_back_template(&target, previous),
        }
    }

    fn check_put_back(&mut self, previous: &Deployed, fallback: &Component) -> Result<(), DriverError> {
        serde_json::from_value::<PodTemplateSpec>(previous.detail["template"].clone()).map(drop).map_err(|e| {
            refused(format!("the journal's record of {} {} has no pod template: {e}", fallback.name, previous.version))
        })
    }

    fn preflight(&mut self, component: &Component, version: &str) -> Result<(), DriverError> {
        let target = self.target(component)?;
        if !target.manifests.is_empty() {
            // The files render and parse, and the API server accepts every object (a
            // server-side dry run: kinds, fields, admission), without changing anything.
            let objects = self.render(&target, version)?;
            return self.apply(&target, &objects, true);
        }
        let (_, mut deployment) = self.deployment(&target)?;
        // The change applies (the container is there), without sending it.
        set_version(&mut deployment, &target, component, version)
    }

    fn check_health(&mut self, component: &Component) -> Result<(), DriverError> {
        let mut target = self.target(component)?;
        if let Some(service) = target.service.clone()
            && let Some(slot) = self.live_slot(&target, &service)?
        {
            target = target.named(&target.slot(&slot));
        }
        let (api, deployment) = self.deployment(&target)?;
        self.follow(&api, deployment, false, &|_| {})
    }

    fn status(&mut self, component: &Component) -> Result<ComponentStatus, DriverError> {
        let mut target = self.target(component)?;
        let base = self.deployment(&target)?.1;
        // Under blue-green, the slot the Service selects; the pods of both are listed.
        if let Some(service) = target.service.clone()
            && let Some(slot) = self.live_slot(&target, &service)?
        {
            target = target.named(&target.slot(&slot));
        }
        let (_, deployment) = self.deployment(&target)?;
        let spec = deployment.spec.clone().unwrap_or_default();
        let version = template_version(&spec.template, target.container.as_deref());
        let status = deployment.status.clone().unwrap_or_default();
        let problem = match progress(&deployment) {
            Progress::Done => None,
            Progress::Waiting(why) | Progress::Failed(why) => Some(why),
        };
        let conditions: Vec<String> = status
            .conditions
            .iter()
            .flatten()
            .map(|c| format!("{}={} ({})", c.type_, c.status, c.reason.as_deref().unwrap_or("-")))
            .collect();
        let problem = problem.map(|p| {
            format!(
                "{p}; replicas {} ready, {} updated of {}; {}",
                status.ready_replicas.unwrap_or(0),
                status.updated_replicas.unwrap_or(0),
                spec.replicas.unwrap_or(1),
                conditions.join(", ")
            )
        });
        let instances = self
            .pods(&target, &base)?
            .iter()
            .map(|pod| {
                let ready = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let restarts = pod_restarts(pod);
                // A terminating pod still says Running until it is gone.
                let terminating = pod.metadata.deletion_timestamp.is_some();
                let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                let template = PodTemplateSpec { metadata: Some(pod.metadata.clone()), spec: pod.spec.clone() };
                InstanceStatus {
                    version: template_version(&template, target.container.as_deref()).unwrap_or_default(),
                    slot: pod.metadata.name.clone().unwrap_or_default(),
                    addr: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
                    pid: None,
                    running: phase == "Running" && !terminating,
                    restarts: u32::try_from(restarts).unwrap_or(0),
                    serving: ready && !terminating,
                    weight: None,
                    requests: None,
                    errors: None,
                    p99_ms: None,
                }
            })
            .collect();
        Ok(ComponentStatus { healthy: problem.is_none(), problem, version, instances, versions: Vec::new() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Deployment as the API server answers it (recorded shapes, trimmed).
    fn deployment(status: &serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": { "name": "notes", "generation": 3 },
            "spec": {
                "replicas": 2,
                "selector": { "matchLabels": { "app": "notes" } },
                "template": {
                    "metadata": { "labels": { "app": "notes" } },
                    "spec": { "containers": [{ "name": "notes", "image": "registry.local:5000/notes:2.0.0" }] }
                }
            },
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn rollout_status_reads_like_kubectl() {
        let waiting = |status: serde_json::Value| match progress(&deployment(&status)) {
            Progress::Waiting(why) => why,
            other => panic!("{other:?}"),
        };
        assert!(waiting(json!({ "observedGeneration": 2 })).contains("controller"));
        assert_eq!(
            waiting(json!({ "observedGeneration": 3, "updatedReplicas": 1, "replicas": 3 })),
            "1 of 2 replicas updated"
        );
        assert_eq!(
            waiting(json!({ "observedGeneration": 3, "updatedReplicas": 2, "replicas": 3 })),
            "1 old replicas are pending termination"
        );
        assert_eq!(
            waiting(json!({ "observedGeneration": 3, "updatedReplicas": 2, "replicas": 2, "availableReplicas": 1 })),
            "1 of 2 updated replicas available"
        );
        let done = json!({ "observedGeneration": 3, "updatedReplicas": 2, "replicas": 2, "availableReplicas": 2 });
        assert_eq!(progress(&deployment(&done)), Progress::Done);
        let stuck = json!({
            "observedGeneration": 3, "updatedReplicas": 1, "replicas": 3, "availableReplicas": 2,
            "conditions": [{
                "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet \"notes-5d\" has timed out progressing."
            }]
        });
        assert!(
            matches!(progress(&deployment(&stuck)), Progress::Failed(why) if why.contains("exceeded its progress deadline"))
        );
    }

    /// A pod as the API server lists it (recorded shape, trimmed).
    fn pod(name: &str, ready: &str, phase: &str, restarts: i32) -> Pod {
        serde_json::from_value(json!({
            "metadata": { "name": name, "labels": { "app": "notes", TRACK_LABEL: "canary" } },
            "status": {
                "phase": phase,
                "conditions": [
                    { "type": "Initialized", "status": "True" },
                    { "type": "Ready", "status": ready },
                    { "type": "ContainersReady", "status": ready }
                ],
                "containerStatuses": [{
                    "name": "notes", "ready": ready == "True", "restartCount": restarts,
                    "image": "upshift-demo-notes:2.0.0", "imageID": "docker://sha256:8ce6", "started": true,
                    "lastState": { "terminated": { "exitCode": 137, "reason": "Error" } }
                }]
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_canary_step_fails_on_an_unready_or_restarted_pod() {
        let steady = [pod("notes-canary-1", "True", "Running", 1), pod("notes-canary-2", "True", "Running", 0)];
        let before = restarts(&steady);
        assert_eq!(canary_verdict(&steady, &before), None, "restarts before the step do not count");
        let restarted = [pod("notes-canary-1", "True", "Running", 2), pod("notes-canary-2", "True", "Running", 0)];
        assert_eq!(
            canary_verdict(&restarted, &before).as_deref(),
            Some("pod notes-canary-1 restarted (2 restarts, 1 when the step began)")
        );
        let crashing = [pod("notes-canary-1", "False", "Running", 1), pod("notes-canary-2", "True", "Running", 0)];
        assert_eq!(canary_verdict(&crashing, &before).as_deref(), Some("pod notes-canary-1 is not ready (Running)"));
        // A pod that came after the step began is judged from zero restarts.
        let replaced = [pod("notes-canary-3", "True", "Running", 1)];
        assert!(canary_verdict(&replaced, &before).is_some_and(|why| why.contains("notes-canary-3 restarted")));
        // A terminating pod is not judged.
        let mut going = pod("notes-canary-1", "False", "Running", 5);
        going.metadata.deletion_timestamp = serde_json::from_value(json!("2026-12-02T07:40:00Z")).unwrap();
        assert_eq!(canary_verdict(&[going], &before), None);
    }

    #[test]
    fn a_live_object_is_applied_again_without_what_the_server_owns() {
        let found: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": "notes-settings", "namespace": "notes", "uid": "0b7c", "resourceVersion": "4711",
                "creationTimestamp": "2026-12-02T07:40:00Z", "labels": { "app": "notes" },
                "annotations": { "kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "a" },
                "managedFields": [{ "manager": "upshift", "operation": "Apply" }]
            },
            "data": { "release": "2.0.0" }
        }))
        .unwrap();
        assert_eq!(
            applicable(&found),
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {
                    "name": "notes-settings", "namespace": "notes", "labels": { "app": "notes" },
                    "annotations": { "team": "a" }
                },
                "data": { "release": "2.0.0" }
            })
        );
    }

    #[test]
    fn manifests_patterns_match_file_names() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.yaml", "a.yaml", "a.yml", "notes.txt"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let names = |pattern: &str| -> Vec<String> {
            matching_files(&dir.path().join(pattern))
                .unwrap()
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names("*.yaml"), ["a.yaml", "b.yaml"]);
        assert_eq!(names("a.*"), ["a.yaml", "a.yml"]);
        assert_eq!(names("b.yaml"), ["b.yaml"]);
        assert!(matching_files(&dir.path().join("*.json")).is_err_and(|e| e.to_string().contains("no file matches")));
    }

    #[test]
    fn canary_replicas_round_up_and_never_reach_zero() {
        assert_eq!(canary_replicas(2, 50), 1);
        assert_eq!(canary_replicas(2, 5), 1);
        assert_eq!(canary_replicas(10, 25), 3);
        assert_eq!(canary_replicas(10, 100), 10);
        assert_eq!(canary_replicas(1, 50), 1);
    }

    /// A Kubernetes API that answers each request in turn from `script` (a part of the
    /// request URI it expects, and the JSON body it answers with), on its own thread;
    /// joining it returns the URIs it was asked.
    fn scripted(script: Vec<(&'static str, String)>) -> (kube::Client, std::thread::JoinHandle<Vec<String>>) {
        type Body = kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let server = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let mut asked = Vec::new();
                for (expected, body) in script {
                    let (request, respond) = handle.next_request().await.expect("the driver asked nothing more");
                    let uri = request.uri().to_string();
                    assert!(uri.contains(expected), "asked {uri}, expected {expected}");
                    asked.push(uri);
                    respond.send_response(http::Response::builder().body(Body::from(body.into_bytes())).unwrap());
                }
                asked
            })
        });
        (kube::Client::new(service, "default"), server)
    }

    /// A watch answer: one event per line.
    fn events(events: &[(&str, &serde_json::Value)]) -> String {
        events.iter().map(|(kind, object)| json!({ "type": kind, "object": object }).to_string() + "\n").collect()
    }

    /// Follows `start` with the scripted API, as `update` does after its write.
    fn follow_scripted(
        start: &serde_json::Value,
        timed_out_before: bool,
        script: Vec<(&'static str, String)>,
    ) -> (Result<(), DriverError>, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let manifest = Manifest::parse(&dir.path().join("upshift.toml"), "[app]\nname = \"x\"\n", |_| None).unwrap();
        let mut driver = KubernetesDriver::new(&manifest).unwrap();
        // The client's buffer task runs on the driver's runtime.
        let (client, server) = {
            let _inside = driver.runtime.enter();
            scripted(script)
        };
        driver.clients.push((None, client.clone()));
        let api: Api<Deployment> = Api::namespaced(client, "default");
        let result = driver.follow(&api, deployment(start), timed_out_before, &|_| {});
        drop(driver);
        (result, server.join().unwrap())
    }

    fn stuck() -> serde_json::Value {
        json!({
            "observedGeneration": 3, "updatedReplicas": 1, "replicas": 3, "availableReplicas": 2,
            "conditions": [{ "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded" }]
        })
    }

    fn with_status(status: &serde_json::Value) -> serde_json::Value {
        serde_json::to_value(deployment(status)).unwrap()
    }

    #[test]
    fn a_deadline_left_by_an_earlier_rollout_waits_for_the_controllers_next_word() {
        let progressing = with_status(&json!({
            "observedGeneration": 3, "updatedReplicas": 2, "replicas": 3, "availableReplicas": 2,
            "conditions": [{ "type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated" }]
        }));
        let done = with_status(
            &json!({ "observedGeneration": 3, "updatedReplicas": 2, "replicas": 2, "availableReplicas": 2 }),
        );
        let (result, asked) = follow_scripted(
            &stuck(),
            true,
            vec![
                ("watch=true", events(&[("MODIFIED", &progressing)])),
                (
                    "watch=true",
                    events(&[
                        (
                            "BOOKMARK",
                            &json!({ "kind": "Deployment", "apiVersion": "apps/v1", "metadata": { "resourceVersion": "9" } }),
                        ),
                        ("MODIFIED", &done),
                    ]),
                ),
            ],
        );
        result.unwrap();
        assert!(asked[0].contains("fieldSelector=metadata.name%3Dnotes"), "{asked:?}");
        // Without an earlier stuck rollout, the same condition is this rollout's failure, at once.
        let (result, asked) = follow_scripted(&stuck(), false, Vec::new());
        assert!(matches!(result, Err(DriverError::Unhealthy(why)) if why.contains("exceeded its progress deadline")));
        assert!(asked.is_empty());
    }

    #[test]
    fn an_expired_or_ended_watch_is_followed_by_a_fresh_read() {
        let waiting = json!({ "observedGeneration": 3, "updatedReplicas": 1, "replicas": 2, "availableReplicas": 1 });
        let done = with_status(
            &json!({ "observedGeneration": 3, "updatedReplicas": 2, "replicas": 2, "availableReplicas": 2 }),
        );
        let gone = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410 });
        let (result, asked) = follow_scripted(
            &waiting,
            false,
            vec![
                ("watch=true", events(&[("ERROR", &gone)])),
                ("/deployments/notes", with_status(&waiting).to_string()),
                ("watch=true", String::new()),
                ("/deployments/notes", done.to_string()),
            ],
        );
        result.unwrap();
        assert_eq!(asked.len(), 4, "{asked:?}");
    }

    #[test]
    fn a_deployment_deleted_during_its_rollout_fails_the_step() {
        let waiting = json!({ "observedGeneration": 3, "updatedReplicas": 1, "replicas": 2, "availableReplicas": 1 });
        let (result, _) =
            follow_scripted(&waiting, false, vec![("watch=true", events(&[("DELETED", &with_status(&waiting))]))]);
        assert!(
            matches!(result, Err(DriverError::Refused(why)) if why == "deployment notes was deleted during the rollout")
        );
    }

    #[test]
    fn the_version_is_the_annotation_else_the_image_tag() {
        let mut d = deployment(&json!({}));
        let template = &mut d.spec.as_mut().unwrap().template;
        assert_eq!(template_version(template, None).as_deref(), Some("2.0.0"));
        template.spec.as_mut().unwrap().containers[0].image = Some("registry.local:5000/notes".into());
        assert_eq!(template_version(template, None).as_deref(), Some("registry.local:5000/notes"));
        template.metadata.as_mut().unwrap().annotations =
            Some([(VERSION_ANNOTATION.to_owned(), "2.1.0".to_owned())].into_iter().collect());
        assert_eq!(template_version(template, Some("notes")).as_deref(), Some("2.1.0"));
    }
}
