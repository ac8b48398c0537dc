//! The soak's CI version (issue 15): a few minutes of pod churn on one agent that fails on a
//! leak it can prove, never on timing.
//!
//! After a warm-up (images pulled and compiled, caches and pools filled), it runs `BATCH`
//! churn cycles and takes the agent's counts (open fds and threads of the agent and of its
//! Wasm runtime process, and the agent's live tokio tasks), then `BATCH` more cycles. Every
//! cycle makes and removes `PODS_PER_CYCLE` pods (jobs, crash loops, HTTP pods with probes,
//! exec, `logs -f`: tests/src/soak.rs), so a leak of one fd, thread or task per pod grows a
//! count by `BATCH * PODS_PER_CYCLE` between the two points. The test waits (on the condition,
//! up to a bound) for every count to come back within `SLACK` of the first point; `SLACK` is
//! well under one per pod, so transient fds (connections closing, blocking threads idling
//! out) pass and a per-pod leak cannot.

use integration_tests::soak::{agent_sample, AgentSample, Churn, KINDS};
use integration_tests::{test_node, wait_for, TestNamespace};
use std::time::Duration;

/// Rounds of every pod kind per cycle (5 kinds).
const ROUNDS: usize = 2;
const PODS_PER_CYCLE: u64 = (ROUNDS * KINDS.len()) as u64;
/// Cycles between the two measuring points.
const BATCH: u64 = 3;
/// What a count may differ by between the two points: a third of one-per-pod growth
/// (BATCH * PODS_PER_CYCLE = 30), far above what settles on its own.
const SLACK: u64 = BATCH * PODS_PER_CYCLE / 3;
/// How long the counts may take to come back after a batch: blocking-pool threads idle out
/// after 10 s, connections to the API server and the kubelet API close within a minute.
const SETTLE: Duration = Duration::from_secs(120);

fn counts(s: &AgentSample) -> Vec<(&'static str, u64)> {
    let mut c = vec![
        ("agent fds", s.agent.fds),
        ("agent threads", s.agent.threads),
    ];
    if let Some(r) = s.runtime {
        c.push(("runtime fds", r.fds));
        c.push(("runtime threads", r.threads));
    }
    if let Some(t) = s.tasks {
        c.push(("agent tokio tasks", t));
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_fds_threads_or_tasks_grow_per_pod_cycle() {
    let agent = test_node("soak-smoke", &[]).await;
    let ns = TestNamespace::new("soak-smoke").await;
    let mut churn = Churn::new(ns, &agent.name);

    // Warm-up: the first pods pull and compile every image and fill the agent's pools.
    for _ in 0..2 {
        churn
            .cycle(&agent, ROUNDS)
            .await
            .unwrap_or_else(|e| panic!("warm-up cycle: {e:#}\nagent log:\n{}", agent.log_tail()));
    }
    for _ in 0..BATCH {
        churn
            .cycle(&agent, ROUNDS)
            .await
            .unwrap_or_else(|e| panic!("cycle: {e:#}\nagent log:\n{}", agent.log_tail()));
    }
    let first = agent_sample(&agent).expect("the agent runs");
    assert!(
        first.tasks.is_some(),
        "the agent serves wasm_kubelet_tokio_alive_tasks on /metrics"
    );
    eprintln!("after {} cycles: {first:?}", churn.counts.cycles);
    for _ in 0..BATCH {
        churn
            .cycle(&agent, ROUNDS)
            .await
            .unwrap_or_else(|e| panic!("cycle: {e:#}\nagent log:\n{}", agent.log_tail()));
    }
    let after = agent_sample(&agent).expect("the agent runs");
    eprintln!("after {} cycles: {after:?}", churn.counts.cycles);
    assert_eq!(
        after.runtime_pid, first.runtime_pid,
        "the Wasm runtime process was replaced during the churn"
    );
    let limit: Vec<(&str, u64)> = counts(&first)
        .into_iter()
        .map(|(what, n)| (what, n + SLACK))
        .collect();
    let settled = wait_for(
        "the agent's counts back within the slack",
        SETTLE,
        || async {
            let now = agent_sample(&agent)?;
            let over: Vec<_> = counts(&now)
                .into_iter()
                .zip(&limit)
                .filter(|((_, n), (_, max))| n > max)
                .collect();
            over.is_empty().then_some(now)
        },
    )
    .await;
    let last = agent_sample(&agent);
    let settled = settled.unwrap_or_else(|e| {
        panic!(
            "{e}: a leak per pod cycle ({} pods between the points, slack {SLACK}):\n  first: {:?}\n  last:  {:?}\nagent log:\n{}",
            BATCH * PODS_PER_CYCLE,
            counts(&first),
            last.as_ref().map(counts),
            agent.log_tail()
        )
    });
    eprintln!(
        "settled: {:?} (first {:?}); pods created {} deleted {}",
        counts(&settled),
        counts(&first),
        churn.counts.created,
        churn.counts.deleted
    );
    assert_eq!(churn.counts.created, churn.counts.deleted);
    assert_eq!(churn.counts.created, churn.counts.cycles * PODS_PER_CYCLE);
}
