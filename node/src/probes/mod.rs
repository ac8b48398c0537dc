//! Probes (liveness, readiness, startup) and lifecycle hooks (postStart, preStop) for a pod's
//! containers, with the kubelet's prober as the reference.
//!
//! Design. Each pod worker owns one [`PodProbes`]: the only holder of its containers' probe
//! results. For every running container instance it runs one prober task per probe kind the
//! container declares ([`PodProbes::reconcile`], called on every sync, starts and stops them:
//! a task lives exactly as long as the container instance it was started for). A prober task
//! owns its schedule and its threshold counters ([`Tracker`]); it emits the `Unhealthy` event
//! of each failed probe itself, as the kubelet's prober does, and sends a [`ProbeUpdate`] over
//! the pod's channel **only when its result changes**. The worker selects on
//! [`PodProbes::recv`] next to its other wake-ups, folds the update in with
//! [`PodProbes::apply`] (readiness -> container `ready`, startup -> `started`), and acts on
//! the [`Kill`] it may return (a failed liveness or startup probe). Startup gates the others:
//! the liveness and readiness tasks are started only once the startup result is success.
//!
//! [`action`] is what a single probe or hook does; [`run_post_start`] and
//! [`stop_with_pre_stop`] are the hooks around a container's start and stop.

pub mod action;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, ObjectReference, Probe};
use provider_api::{Provider, ProviderError};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

pub use action::Action;

use crate::events::EventSink;

/// The API server's defaults for a probe (kept here for specs that bypassed defaulting).
const DEFAULT_PERIOD_SECONDS: i32 = 10;
const DEFAULT_TIMEOUT_SECONDS: i32 = 1;
const DEFAULT_SUCCESS_THRESHOLD: i32 = 1;
const DEFAULT_FAILURE_THRESHOLD: i32 = 3;
/// After a preStop hook, the container still gets at least this long to stop (the kubelet's
/// `minimumGracePeriodInSeconds`).
const MIN_GRACE_AFTER_PRE_STOP: Duration = Duration::from_secs(2);
/// The kubelet runs postStart without a deadline; the worker waits for it, so bound it at the
/// kubelet's default terminationGracePeriodSeconds rather than wedge the pod forever.
const POST_START_LIMIT: Duration = Duration::from_secs(30);

/// The three probe kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    /// As the kubelet capitalises it in events ("Liveness probe failed: ...").
    pub fn label(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "Liveness",
            ProbeKind::Readiness => "Readiness",
            ProbeKind::Startup => "Startup",
        }
    }

    /// The result reported before the first probe: liveness starts as success; readiness and
    /// startup start unknown (not ready, not started), so their first settled result, failure
    /// included, is a change.
    fn initial(self) -> Option<bool> {
        matches!(self, ProbeKind::Liveness).then_some(true)
    }

    fn of(self, c: &Container) -> Option<&Probe> {
        match self {
            ProbeKind::Liveness => c.liveness_probe.as_ref(),
            ProbeKind::Readiness => c.readiness_probe.as_ref(),
            ProbeKind::Startup => c.startup_probe.as_ref(),
        }
    }
}

/// A probe's timing and thresholds, with defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Timing {
    pub fn of(p: &Probe) -> Timing {
        let secs =
            |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
        let count = |v: Option<i32>, default: i32| v.unwrap_or(default).max(1) as u32;
        Timing {
            initial_delay: secs(p.initial_delay_seconds, 0),
            // A zero period would spin: the API server rejects it, and so does this.
            period: secs(p.period_seconds, DEFAULT_PERIOD_SECONDS).max(Duration::from_secs(1)),
            timeout: secs(p.timeout_seconds, DEFAULT_TIMEOUT_SECONDS).max(Duration::from_secs(1)),
            success_threshold: count(p.success_threshold, DEFAULT_SUCCESS_THRESHOLD),
            failure_threshold: count(p.failure_threshold, DEFAULT_FAILURE_THRESHOLD),
        }
    }
}

/// Consecutive-result counting, as the kubelet's probe worker does it: a result is reported
/// after `successThreshold` successes or `failureThreshold` failures in a row, and only when
/// it differs from the one reported before.
#[derive(Debug, Clone)]
pub struct Tracker {
    success_threshold: u32,
    failure_threshold: u32,
    last: Option<bool>,
    run: u32,
    reported: Option<bool>,
}

impl Tracker {
    pub fn new(kind: ProbeKind, timing: &Timing) -> Tracker {
        Tracker {
            success_threshold: timing.success_threshold,
            failure_threshold: timing.failure_threshold,
            last: None,
            run: 0,
            reported: kind.initial(),
        }
    }

    /// Counts one probe result; returns the new reported result when it changes.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if self.last == Some(ok) {
            self.run = self.run.saturating_add(1);
        } else {
            self.last = Some(ok);
            self.run = 1;
        }
        let threshold = if ok {
            self.success_threshold
        } else {
            self.failure_threshold
        };
        if self.run < threshold || self.reported == Some(ok) {
            return None;
        }
        self.reported = Some(ok);
        Some(ok)
    }
}

/// Runs probes on the schedule until the result is final for this container instance, calling
/// `report` with each changed result. The first probe is at `first` (the container's start
/// plus initialDelaySeconds), then one every period; a probe that overruns skips the ticks it
/// missed (like the kubelet's ticker). Liveness and startup end on their first reported
/// failure (the container will be restarted) and startup on its success; readiness runs on.
pub async fn probe_loop<P, PF, F, R>(
    kind: ProbeKind,
    timing: Timing,
    first: Instant,
    mut probe: P,
    mut on_failure: F,
    mut report: R,
) where
    P: FnMut() -> PF,
    PF: Future<Output = Result<(), String>>,
    F: FnMut(&str),
    R: FnMut(bool),
{
    let mut tracker = Tracker::new(kind, &timing);
    let mut at = first;
    loop {
        tokio::time::sleep_until(at).await;
        let result = probe().await;
        if let Err(message) = &result {
            on_failure(message);
        }
        if let Some(changed) = tracker.observe(result.is_ok()) {
            report(changed);
            let done = match kind {
                ProbeKind::Readiness => false,
                ProbeKind::Startup => true,
                ProbeKind::Liveness => !changed,
            };
            if done {
                return;
            }
        }
        let now = Instant::now();
        at += timing.period;
        while at <= now {
            at += timing.period;
        }
    }
}

/// A changed probe result, from a prober task to its pod's worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeUpdate {
    pub container: String,
    /// The provider's id of the instance probed: a late update about an old instance is dropped.
    pub id: String,
    pub kind: ProbeKind,
    pub ok: bool,
}

/// What the worker must do after a liveness or startup failure: stop the instance and let the
/// restart policy decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kill {
    pub container: String,
    pub id: String,
    pub kind: ProbeKind,
    /// The probe's terminationGracePeriodSeconds, when it sets one (else the pod's applies).
    pub grace: Option<Duration>,
}

impl Kill {
    /// The kubelet's Killing message.
    pub fn message(&self) -> String {
        format!(
            "Container {} failed {} probe, will be restarted",
            self.container,
            self.kind.label().to_lowercase()
        )
    }
}

/// Probe state of one running container instance.
struct Instance {
    id: String,
    started: bool,
    ready: bool,
    tasks: HashMap<ProbeKind, AbortHandle>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

/// A running container as [`PodProbes::reconcile`] needs it.
pub struct Running<'a> {
    pub container: &'a Container,
    pub id: &'a str,
    pub started_at: Instant,
}

/// The probe results of one pod and the prober tasks that produce them; owned by the pod's worker.
pub struct PodProbes {
    provider: Arc<dyn Provider>,
    events: EventSink,
    pod_ip: String,
    pod_ref: ObjectReference,
    /// The probers' results, made with the first prober: an unbounded channel allocates a block
    /// of slots up front (~2 KiB), which most pods (no probes) never use.
    channel: Option<(
        mpsc::UnboundedSender<ProbeUpdate>,
        mpsc::UnboundedReceiver<ProbeUpdate>,
    )>,
    instances: HashMap<String, Instance>,
    /// The containers and kinds a prober ran for: their `prober_probe_total` series go with the pod.
    probed: HashSet<(ProbeKind, String)>,
}

impl PodProbes {
    pub fn new(
        provider: Arc<dyn Provider>,
        events: EventSink,
        pod_ip: String,
        pod_ref: ObjectReference,
    ) -> PodProbes {
        PodProbes {
            provider,
            events,
            pod_ip,
            pod_ref,
            channel: None,
            instances: HashMap::new(),
            probed: HashSet::new(),
        }
    }

    /// The default host of the probes started from now on (the pod's IP, once known).
    pub fn set_pod_ip(&mut self, pod_ip: String) {
        self.pod_ip = pod_ip;
    }

    /// The next changed result. Never ends (this holds a sender): select on it.
    pub async fn recv(&mut self) -> ProbeUpdate {
        match self.channel.as_mut() {
            Some((_, rx)) => match rx.recv().await {
                Some(update) => update,
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// Starts the prober tasks `running` containers need and stops those of containers that no
    /// longer run (or run as a new instance).
    pub fn reconcile(&mut self, running: &[Running<'_>]) {
        self.instances.retain(|name, inst| {
            running
                .iter()
                .any(|r| r.container.name == *name && r.id == inst.id)
        });
        for r in running {
            let c = r.container;
            let inst = self
                .instances
                .entry(c.name.clone())
                .or_insert_with(|| Instance {
                    id: r.id.to_string(),
                    started: c.startup_probe.is_none(),
                    ready: false,
                    tasks: HashMap::new(),
                });
            let kinds: &[ProbeKind] = if inst.started {
                &[ProbeKind::Liveness, ProbeKind::Readiness]
            } else {
                &[ProbeKind::Startup]
            };
            for &kind in kinds {
                let Some(probe) = kind.of(c) else { continue };
                if inst.tasks.contains_key(&kind) {
                    continue;
                }
                let task = spawn_prober(
                    kind,
                    probe,
                    c,
                    r.id,
                    r.started_at,
                    self.provider.clone(),
                    self.events.clone(),
                    container_ref(&self.pod_ref, &c.name),
                    &self.pod_ip,
                    self.channel
                        .get_or_insert_with(mpsc::unbounded_channel)
                        .0
                        .clone(),
                );
                inst.tasks.insert(kind, task);
                self.probed.insert((kind, c.name.clone()));
            }
        }
    }

    /// Folds a changed result in. Returns the kill a liveness or startup failure calls for.
    pub fn apply(&mut self, update: ProbeUpdate, spec: &[Container]) -> Option<Kill> {
        let inst = self
            .instances
            .get_mut(&update.container)
            .filter(|i| i.id == update.id)?;
        debug!(container = %update.container, kind = ?update.kind, ok = update.ok, "probe result changed");
        match (update.kind, update.ok) {
            (ProbeKind::Readiness, ready) => inst.ready = ready,
            (ProbeKind::Startup, true) => inst.started = true,
            (ProbeKind::Liveness, true) => {}
            (kind @ (ProbeKind::Startup | ProbeKind::Liveness), false) => {
                let grace = spec
                    .iter()
                    .find(|c| c.name == update.container)
                    .and_then(|c| kind.of(c))
                    .and_then(|p| p.termination_grace_period_seconds)
                    .map(|s| Duration::from_secs(s.max(0) as u64));
                return Some(Kill {
                    container: update.container,
                    id: update.id,
                    kind,
                    grace,
                });
            }
        }
        None
    }

    /// Whether a running container counts as ready: by its readiness probe, else as soon as it
    /// runs (and never before it has started).
    pub fn ready(&self, c: &Container) -> bool {
        match self.instances.get(&c.name) {
            Some(inst) => inst.started && (c.readiness_probe.is_none() || inst.ready),
            None => c.readiness_probe.is_none() && c.startup_probe.is_none(),
        }
    }

    /// Whether a running container counts as started: by its startup probe, else as soon as it runs.
    pub fn started(&self, c: &Container) -> bool {
        match self.instances.get(&c.name) {
            Some(inst) => inst.started,
            None => c.startup_probe.is_none(),
        }
    }
}

/// The probe outcomes `prober_probe_total` counts, as the kubelet labels them.
const PROBE_RESULTS: [&str; 2] = ["successful", "failed"];

/// A container's `prober_probe_total` series (`/metrics/probes`) for one kind and result.
fn probe_series(
    pod_ref: &ObjectReference,
    container: &str,
    kind: ProbeKind,
    result: &'static str,
) -> crate::metrics::ProbeLabels {
    crate::metrics::ProbeLabels {
        probe_type: kind.label(),
        result,
        container: container.to_string(),
        pod: pod_ref.name.clone().unwrap_or_default(),
        namespace: pod_ref.namespace.clone().unwrap_or_default(),
        pod_uid: pod_ref.uid.clone().unwrap_or_default(),
    }
}

impl Drop for PodProbes {
    /// The pod's worker is done: its probe series go, as the kubelet's prober drops them.
    fn drop(&mut self) {
        let total = &crate::metrics::probes().probe_total;
        for (kind, container) in &self.probed {
            for result in PROBE_RESULTS {
                total.remove(&probe_series(&self.pod_ref, container, *kind, result));
            }
        }
    }
}

fn container_ref(pod_ref: &ObjectReference, container: &str) -> ObjectReference {
    let mut r = pod_ref.clone();
    r.field_path = Some(format!("spec.containers{{{container}}}"));
    r
}

#[allow(clippy::too_many_arguments)]
fn spawn_prober(
    kind: ProbeKind,
    probe: &Probe,
    container: &Container,
    id: &str,
    started_at: Instant,
    provider: Arc<dyn Provider>,
    events: EventSink,
    cref: ObjectReference,
    pod_ip: &str,
    tx: mpsc::UnboundedSender<ProbeUpdate>,
) -> AbortHandle {
    let timing = Timing::of(probe);
    let action = Action::from_probe(probe, container, pod_ip);
    let (name, id) = (container.name.clone(), id.to_string());
    // This prober's prober_probe_total series, one per result.
    let series: Arc<[crate::metrics::ProbeLabels; 2]> =
        Arc::new(PROBE_RESULTS.map(|result| probe_series(&cref, &name, kind, result)));
    let first = (started_at + timing.initial_delay).max(Instant::now());
    let task = async move {
        let probe = || {
            let (provider, action, id, series) =
                (provider.clone(), action.clone(), id.clone(), series.clone());
            async move {
                let result = action.run(&provider, &id, timing.timeout).await;
                crate::metrics::probes()
                    .probe_total
                    .get_or_create(if result.is_ok() {
                        &series[0]
                    } else {
                        &series[1]
                    })
                    .inc();
                result
            }
        };
        let on_failure = |message: &str| {
            debug!(container = %name, ?kind, message, "probe failed");
            events.warning(
                &cref,
                "Unhealthy",
                format!("{} probe failed: {message}", kind.label()),
            );
        };
        let report = |ok: bool| {
            let _ = tx.send(ProbeUpdate {
                container: name.clone(),
                id: id.clone(),
                kind,
                ok,
            });
        };
        probe_loop(kind, timing, first, probe, on_failure, report).await;
    };
    tokio::spawn(task).abort_handle()
}

/// Runs the container's postStart hook, if it has one, right after the container started.
/// `Err` carries the failure, for the log; the caller emits `FailedPostStartHook` and kills.
pub async fn run_post_start(
    provider: &Arc<dyn Provider>,
    container: &Container,
    id: &str,
    pod_ip: &str,
) -> Result<(), String> {
    let Some(handler) = container
        .lifecycle
        .as_ref()
        .and_then(|l| l.post_start.as_ref())
    else {
        return Ok(());
    };
    Action::from_handler(handler, container, pod_ip)
        .run(provider, id, POST_START_LIMIT)
        .await
}

/// Stops a container the kubelet's way: its preStop hook first (when it has one), bounded by
/// `grace`, then the stop with what is left of the grace period (at least 2 s after a hook).
/// A failed hook is a `FailedPreStopHook` event; the container is stopped all the same.
pub async fn stop_with_pre_stop(
    provider: &Arc<dyn Provider>,
    events: &EventSink,
    cref: &ObjectReference,
    container: Option<&Container>,
    id: &str,
    pod_ip: &str,
    grace: Duration,
) -> Result<(), ProviderError> {
    let mut left = grace;
    if let Some((c, handler)) =
        container.and_then(|c| Some((c, c.lifecycle.as_ref()?.pre_stop.as_ref()?)))
    {
        if !grace.is_zero() {
            let began = Instant::now();
            let action = Action::from_handler(handler, c, pod_ip);
            match tokio::time::timeout(grace, action.run(provider, id, grace)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(container = %c.name, error = %e, "preStop hook failed");
                    events.warning(
                        cref,
                        "FailedPreStopHook",
                        format!("PreStopHook failed: {e}"),
                    );
                }
                Err(_) => {
                    warn!(container = %c.name, ?grace, "preStop hook did not finish within the grace period");
                    events.warning(
                        cref,
                        "FailedPreStopHook",
                        format!("PreStopHook did not complete within {}s", grace.as_secs()),
                    );
                }
            }
            left = grace
                .saturating_sub(began.elapsed())
                .max(MIN_GRACE_AFTER_PRE_STOP);
        }
    }
    provider.stop_container(id, left).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn timing(delay: u64, period: u64, success: u32, failure: u32) -> Timing {
        Timing {
            initial_delay: Duration::from_secs(delay),
            period: Duration::from_secs(period),
            timeout: Duration::from_secs(1),
            success_threshold: success,
            failure_threshold: failure,
        }
    }

    #[test]
    fn thresholds_count_consecutive_results() {
        let t = timing(0, 10, 2, 3);
        let mut readiness = Tracker::new(ProbeKind::Readiness, &t);
        assert_eq!(readiness.observe(true), None, "one success of two");
        assert_eq!(readiness.observe(false), None, "a failure resets the run");
        assert_eq!(readiness.observe(true), None);
        assert_eq!(readiness.observe(true), Some(true));
        assert_eq!(readiness.observe(true), None, "only changes are reported");
        assert_eq!(readiness.observe(false), None);
        assert_eq!(readiness.observe(false), None);
        assert_eq!(readiness.observe(false), Some(false));
        assert_eq!(readiness.observe(false), None);

        let mut liveness = Tracker::new(ProbeKind::Liveness, &timing(0, 10, 1, 1));
        assert_eq!(liveness.observe(true), None, "alive from the start");
        assert_eq!(liveness.observe(false), Some(false));

        let mut startup = Tracker::new(ProbeKind::Startup, &timing(0, 10, 1, 2));
        assert_eq!(startup.observe(false), None);
        assert_eq!(startup.observe(true), Some(true));
        let mut startup = Tracker::new(ProbeKind::Startup, &timing(0, 10, 1, 2));
        assert_eq!(startup.observe(false), None);
        assert_eq!(
            startup.observe(false),
            Some(false),
            "a startup that never succeeds is reported"
        );
    }

    #[test]
    fn defaults_are_the_api_servers() {
        let t = Timing::of(&Probe::default());
        assert_eq!(t, timing(0, 10, 1, 3));
        let p: Probe = serde_json::from_value(serde_json::json!({"initialDelaySeconds": 5, "periodSeconds": 2, "timeoutSeconds": 3, "successThreshold": 2, "failureThreshold": 1})).unwrap();
        assert_eq!(
            Timing::of(&p),
            Timing {
                timeout: Duration::from_secs(3),
                ..timing(5, 2, 2, 1)
            }
        );
    }

    /// Runs `probe_loop` with paused time; returns the probe times (seconds since start) and
    /// the reports with their times.
    async fn schedule(
        kind: ProbeKind,
        t: Timing,
        results: Vec<bool>,
    ) -> (Vec<u64>, Vec<(u64, bool)>) {
        let start = Instant::now();
        let probes = Arc::new(Mutex::new(Vec::new()));
        let reports = Arc::new(Mutex::new(Vec::new()));
        let results = Arc::new(Mutex::new(results.into_iter()));
        let (p, r) = (probes.clone(), reports.clone());
        let run = probe_loop(
            kind,
            t,
            start + t.initial_delay,
            move || {
                p.lock().unwrap().push(start.elapsed().as_secs());
                let ok = results.lock().unwrap().next();
                async move {
                    match ok {
                        Some(true) => Ok(()),
                        Some(false) => Err("failed".into()),
                        None => std::future::pending().await,
                    }
                }
            },
            |_| {},
            move |ok| r.lock().unwrap().push((start.elapsed().as_secs(), ok)),
        );
        let _ = tokio::time::timeout(Duration::from_secs(3600), run).await;
        let probes = probes.lock().unwrap().clone();
        let reports = reports.lock().unwrap().clone();
        (probes, reports)
    }

    #[tokio::test(start_paused = true)]
    async fn liveness_fails_after_the_threshold_then_stops() {
        let (probes, reports) = schedule(
            ProbeKind::Liveness,
            timing(5, 10, 1, 3),
            vec![true, false, false, false, true],
        )
        .await;
        assert_eq!(
            probes,
            vec![5, 15, 25, 35],
            "first after initialDelaySeconds, then every period, none after the failure"
        );
        assert_eq!(reports, vec![(35, false)]);
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_reports_each_change_and_keeps_probing() {
        let (probes, reports) = schedule(
            ProbeKind::Readiness,
            timing(0, 1, 1, 2),
            vec![false, true, true, false, false, true],
        )
        .await;
        assert_eq!(probes, vec![0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(reports, vec![(1, true), (4, false), (5, true)]);
    }

    #[tokio::test(start_paused = true)]
    async fn startup_ends_on_success() {
        let (probes, reports) = schedule(
            ProbeKind::Startup,
            timing(0, 2, 1, 10),
            vec![false, false, true, true],
        )
        .await;
        assert_eq!(probes, vec![0, 2, 4]);
        assert_eq!(reports, vec![(4, true)]);
    }

    #[tokio::test(start_paused = true)]
    async fn startup_failure_is_reported_and_ends_probing() {
        let (probes, reports) = schedule(
            ProbeKind::Startup,
            timing(0, 1, 1, 2),
            vec![false, false, false],
        )
        .await;
        assert_eq!(probes, vec![0, 1]);
        assert_eq!(reports, vec![(1, false)]);
    }

    #[test]
    fn a_pods_probe_series_go_with_its_prober() {
        let pod = |uid: &str| ObjectReference {
            name: Some("p".into()),
            namespace: Some("ns".into()),
            uid: Some(uid.into()),
            ..Default::default()
        };
        let (gone, stays) = (
            pod("uid-of-a-pod-that-goes"),
            pod("uid-of-a-pod-that-stays"),
        );
        let total = &crate::metrics::probes().probe_total;
        for (kind, result) in [
            (ProbeKind::Liveness, "failed"),
            (ProbeKind::Readiness, "successful"),
        ] {
            total
                .get_or_create(&probe_series(&gone, "c", kind, result))
                .inc();
            total
                .get_or_create(&probe_series(&stays, "c", kind, result))
                .inc();
        }
        let probed = HashSet::from([
            (ProbeKind::Liveness, "c".to_string()),
            (ProbeKind::Readiness, "c".to_string()),
        ]);
        let probes = PodProbes {
            provider: Arc::new(action::tests::NoProvider),
            events: EventSink::disabled(),
            pod_ip: "h".into(),
            pod_ref: gone,
            channel: None,
            instances: HashMap::new(),
            probed,
        };
        assert!(crate::metrics::render_probes().contains("uid-of-a-pod-that-goes"));
        drop(probes);
        let text = crate::metrics::render_probes();
        assert!(!text.contains("uid-of-a-pod-that-goes"), "{text}");
        assert_eq!(text.matches("uid-of-a-pod-that-stays").count(), 2, "{text}");
    }

    #[test]
    fn ready_and_started_follow_the_probes() {
        let c = |v: serde_json::Value| -> Container { serde_json::from_value(v).unwrap() };
        let plain = c(serde_json::json!({"name": "a"}));
        let gated =
            c(serde_json::json!({"name": "b", "readinessProbe": {"exec": {"command": ["true"]}}}));
        let mut probes = PodProbes {
            provider: Arc::new(action::tests::NoProvider),
            events: EventSink::disabled(),
            pod_ip: "h".into(),
            pod_ref: Default::default(),
            channel: None,
            instances: HashMap::new(),
            probed: HashSet::new(),
        };
        assert!(probes.ready(&plain) && probes.started(&plain));
        assert!(!probes.ready(&gated) && probes.started(&gated));
        probes.instances.insert(
            "b".into(),
            Instance {
                id: "1".into(),
                started: true,
                ready: false,
                tasks: HashMap::new(),
            },
        );
        assert_eq!(
            probes.apply(
                ProbeUpdate {
                    container: "b".into(),
                    id: "0".into(),
                    kind: ProbeKind::Readiness,
                    ok: true
                },
                &[]
            ),
            None
        );
        assert!(
            !probes.ready(&gated),
            "an update about an old instance is dropped"
        );
        probes.apply(
            ProbeUpdate {
                container: "b".into(),
                id: "1".into(),
                kind: ProbeKind::Readiness,
                ok: true,
            },
            &[],
        );
        assert!(probes.ready(&gated));
        let kill = probes
            .apply(
                ProbeUpdate {
                    container: "b".into(),
                    id: "1".into(),
                    kind: ProbeKind::Liveness,
                    ok: false,
                },
                &[],
            )
            .unwrap();
        assert_eq!(
            kill.message(),
            "Container b failed liveness probe, will be restarted"
        );
    }
}
