//! What a pod's containers do next, decided from what the worker knows: the pure half of the
//! kubelet's `computePodActions`. The worker (worker.rs) gathers a [`Seen`] per container,
//! asks [`plan`], and carries the [`Step`]s out (pull, create, start, stop). No I/O here, so
//! the restart matrix (policies, init containers, spec changes, runs known only from the pod's
//! status) is table-tested below without a cluster or a provider.

/// `spec.restartPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// The pod's policy; absent or unknown is `Always`, the API server's default.
    pub fn of(spec: Option<&str>) -> Self {
        match spec {
            Some("Never") => Self::Never,
            Some("OnFailure") => Self::OnFailure,
            _ => Self::Always,
        }
    }

    /// Whether a run that ended with `exit_code` is followed by another.
    pub fn restarts_after(self, exit_code: i32) -> bool {
        match self {
            Self::Always => true,
            Self::OnFailure => exit_code != 0,
            Self::Never => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::OnFailure => "OnFailure",
            Self::Never => "Never",
        }
    }
}

/// A container's state as the runtime last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Now {
    Created,
    Running,
    Exited { exit_code: i32 },
}

/// What the worker knows of one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seen {
    /// The runtime's state of the current run; `None` before the first run, or when the run is
    /// known only from the pod's status (an agent restart) or was lost.
    pub now: Option<Now>,
    /// The exit code of the last finished run, from the runtime or the pod's status.
    pub last_exit: Option<i32>,
    /// Whether the worker holds the runtime's ID of the current run.
    pub has_id: bool,
    /// Runs started so far.
    pub attempts: u32,
    /// The hash of the definition the running container was started with (0: unknown).
    pub started_hash: u64,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Start the container's next run (pull per policy, create, start), after its backoff.
    Start { name: String, init: bool },
    /// Its definition changed: stop the running one (no backoff, not a failure), then start.
    Replace { name: String },
}

/// The steps for a pod whose init containers are `init` and app containers `app`, each with
/// the hash of its current definition; `seen` answers what the worker knows of a container.
///
/// Init containers run in order, each to success before the next; a running one, or a failed
/// one under `Never`, holds the rest back. App containers each restart per `policy`.
pub fn plan(
    policy: RestartPolicy,
    init: &[(&str, u64)],
    app: &[(&str, u64)],
    seen: impl Fn(&str) -> Seen,
) -> Vec<Step> {
    for (name, _) in init {
        let s = seen(name);
        match s.now {
            Some(Now::Exited { exit_code: 0 }) => continue,
            None if s.last_exit == Some(0) && !s.has_id => continue,
            Some(Now::Running | Now::Created) => return Vec::new(),
            // The pod fails; nothing more starts.
            Some(Now::Exited { .. }) if policy == RestartPolicy::Never => return Vec::new(),
            _ => {
                return vec![Step::Start {
                    name: name.to_string(),
                    init: true,
                }]
            }
        }
    }
    let mut steps = Vec::new();
    for (name, hash) in app {
        let s = seen(name);
        if s.now == Some(Now::Running) && s.started_hash != 0 && s.started_hash != *hash {
            steps.push(Step::Replace {
                name: name.to_string(),
            });
            continue;
        }
        let start = match (s.now, s.last_exit) {
            (Some(Now::Running | Now::Created), _) => false,
            (Some(Now::Exited { exit_code }), _) => policy.restarts_after(exit_code),
            // Known only from the pod's status (an agent restart): follow the policy.
            (None, Some(exit_code)) if !s.has_id && s.attempts > 0 => {
                policy.restarts_after(exit_code)
            }
            (None, _) => true,
        };
        if start {
            steps.push(Step::Start {
                name: name.to_string(),
                init: false,
            });
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use RestartPolicy::*;

    fn start(name: &str) -> Step {
        Step::Start {
            name: name.into(),
            init: false,
        }
    }
    fn start_init(name: &str) -> Step {
        Step::Start {
            name: name.into(),
            init: true,
        }
    }
    fn exited(code: i32) -> Seen {
        Seen {
            now: Some(Now::Exited { exit_code: code }),
            last_exit: Some(code),
            has_id: true,
            attempts: 1,
            started_hash: 7,
        }
    }
    fn running(hash: u64) -> Seen {
        Seen {
            now: Some(Now::Running),
            has_id: true,
            attempts: 1,
            started_hash: hash,
            ..Default::default()
        }
    }
    /// Finished before the agent restarted: known only from the pod's status.
    fn from_status(code: i32) -> Seen {
        Seen {
            now: None,
            last_exit: Some(code),
            has_id: false,
            attempts: 1,
            started_hash: 0,
        }
    }
    fn run(policy: RestartPolicy, init: &[&str], app: &[&str], seen: &[(&str, Seen)]) -> Vec<Step> {
        let seen: HashMap<&str, Seen> = seen.iter().copied().collect();
        fn with_hash<'a>(names: &[&'a str]) -> Vec<(&'a str, u64)> {
            names.iter().map(|n| (*n, 7u64)).collect()
        }
        plan(policy, &with_hash(init), &with_hash(app), |n| {
            seen.get(n).copied().unwrap_or_default()
        })
    }

    #[test]
    fn restart_policies_decide_what_follows_an_exit() {
        // (policy, exit code) -> restarted?
        let table = [
            (Always, 0, true),
            (Always, 1, true),
            (OnFailure, 0, false),
            (OnFailure, 137, true),
            (Never, 0, false),
            (Never, 1, false),
        ];
        for (policy, code, restarts) in table {
            let steps = run(policy, &[], &["app"], &[("app", exited(code))]);
            assert_eq!(
                !steps.is_empty(),
                restarts,
                "{policy:?} after exit {code}: {steps:?}"
            );
            // The same run known only from the pod's status (an agent restart) decides the same.
            let steps = run(policy, &[], &["app"], &[("app", from_status(code))]);
            assert_eq!(
                !steps.is_empty(),
                restarts,
                "{policy:?} after exit {code}, from the status: {steps:?}"
            );
        }
    }

    #[test]
    fn new_containers_start_and_running_ones_stay() {
        assert_eq!(run(Never, &[], &["a", "b"], &[]), [start("a"), start("b")]);
        assert_eq!(
            run(Always, &[], &["a", "b"], &[("a", running(7))]),
            [start("b")]
        );
        let created = Seen {
            now: Some(Now::Created),
            has_id: true,
            attempts: 1,
            ..Default::default()
        };
        assert_eq!(run(Always, &[], &["a"], &[("a", created)]), []);
        // A run that was lost (no state, no ID, but runs before): started again whatever the policy says
        // of exits, because it did not exit.
        let lost = Seen {
            now: None,
            last_exit: Some(137),
            has_id: false,
            attempts: 1,
            started_hash: 0,
        };
        assert_eq!(run(Always, &[], &["a"], &[("a", lost)]), [start("a")]);
    }

    #[test]
    fn init_containers_run_in_order_each_to_success() {
        assert_eq!(
            run(Always, &["i1", "i2"], &["app"], &[]),
            [start_init("i1")],
            "the first init container alone"
        );
        assert_eq!(
            run(Always, &["i1", "i2"], &["app"], &[("i1", running(7))]),
            [],
            "nothing while it runs"
        );
        assert_eq!(
            run(Always, &["i1", "i2"], &["app"], &[("i1", exited(0))]),
            [start_init("i2")]
        );
        assert_eq!(
            run(
                Always,
                &["i1", "i2"],
                &["app"],
                &[("i1", exited(0)), ("i2", exited(0))]
            ),
            [start("app")]
        );
        assert_eq!(
            run(Always, &["i1"], &["app"], &[("i1", exited(1))]),
            [start_init("i1")],
            "a failed init container runs again"
        );
        assert_eq!(
            run(OnFailure, &["i1"], &["app"], &[("i1", exited(1))]),
            [start_init("i1")]
        );
        assert_eq!(
            run(Never, &["i1"], &["app"], &[("i1", exited(1))]),
            [],
            "under Never the pod fails"
        );
        // Succeeded before an agent restart: known from the status only, not run again.
        assert_eq!(
            run(Always, &["i1"], &["app"], &[("i1", from_status(0))]),
            [start("app")]
        );
    }

    #[test]
    fn a_changed_definition_replaces_the_running_container() {
        assert_eq!(
            run(Always, &[], &["app"], &[("app", running(9))]),
            [Step::Replace { name: "app".into() }]
        );
        assert_eq!(
            run(Never, &[], &["app"], &[("app", running(9))]),
            [Step::Replace { name: "app".into() }],
            "whatever the policy"
        );
        assert_eq!(
            run(Always, &[], &["app"], &[("app", running(0))]),
            [],
            "an unknown hash is no change"
        );
        assert_eq!(run(Always, &[], &["app"], &[("app", running(7))]), []);
    }

    #[test]
    fn policies_parse_with_the_api_servers_default() {
        assert_eq!(RestartPolicy::of(None), Always);
        assert_eq!(RestartPolicy::of(Some("OnFailure")), OnFailure);
        assert_eq!(RestartPolicy::of(Some("Never")).as_str(), "Never");
    }
}
