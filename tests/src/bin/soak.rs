//! The soak (issue 15): pod churn on one agent of its own against deploy/local-cluster for a
//! given time, sampling what the agent holds every 10 s. `deploy/soak` runs it.
//!
//!   soak [--duration 60m] [--rounds 4] [--out docs/soak] [--name soak-60m] [AGENT FLAGS...]
//!
//! Each cycle makes `rounds` pods of every kind (tests/src/soak.rs: jobs, crash loops, HTTP
//! pods with probes, exec, `logs -f`), takes each to its state, deletes them all and waits
//! until they are gone from the API server and from the agent. Every 10 s it samples the
//! agent's and its Wasm runtime process's RSS, open fds and threads (/proc) and the agent's
//! live tokio tasks (`wasm_kubelet_tokio_alive_tasks` on its /metrics). It writes
//! OUT/NAME.csv, OUT/NAME.json (the series and the summary) and OUT/NAME.svg (the plot), and
//! prints the summary: least-squares slopes per hour, pods created and deleted, pods left or
//! stuck. It exits non-zero when a pod was stuck or left behind; it never fails on timing.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use integration_tests::soak::{agent_sample, slope, AgentSample, Churn, KINDS};
use integration_tests::{test_node, TestNamespace};
use tokio::sync::Mutex;

/// How often the agent is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

struct Args {
    duration: Duration,
    rounds: usize,
    out: PathBuf,
    name: String,
    agent_flags: Vec<String>,
}

fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().with_context(|| format!("duration {s:?}"))?;
    Ok(Duration::from_secs(match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => bail!("duration {s:?}: a number of s, m or h"),
    }))
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        duration: Duration::from_secs(3600),
        rounds: 4,
        out: integration_tests::workspace_root().join("docs/soak"),
        name: String::new(),
        agent_flags: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--duration" => a.duration = parse_duration(&value()?)?,
            "--rounds" => a.rounds = value()?.parse().context("--rounds")?,
            "--out" => a.out = value()?.into(),
            "--name" => a.name = value()?,
            _ => a.agent_flags.push(arg),
        }
    }
    if a.name.is_empty() {
        a.name = format!("soak-{}m", a.duration.as_secs() / 60);
    }
    Ok(a)
}

/// One row of the series.
#[derive(Debug, Clone)]
struct Row {
    seconds: f64,
    sample: AgentSample,
    created: u64,
    deleted: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let flags: Vec<&str> = args.agent_flags.iter().map(String::as_str).collect();
    let agent = Arc::new(test_node("soak", &flags).await);
    let ns = TestNamespace::new("soak").await;
    let churn = Arc::new(Mutex::new(Churn::new(ns, &agent.name)));
    let started = Instant::now();
    eprintln!(
        "soak: node {} for {:?}, {} pods per cycle",
        agent.name,
        args.duration,
        args.rounds * KINDS.len()
    );

    let rows: Arc<Mutex<Vec<Row>>> = Arc::default();
    let sampler = {
        let (agent, rows) = (agent.clone(), rows.clone());
        let progress = churn.lock().await.progress.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tick.tick().await;
                let a = agent.clone();
                let Ok(Some(sample)) = tokio::task::spawn_blocking(move || agent_sample(&a)).await
                else {
                    eprintln!("soak: the agent is gone");
                    return;
                };
                rows.lock().await.push(Row {
                    seconds: started.elapsed().as_secs_f64(),
                    sample,
                    created: progress.created.load(Ordering::Relaxed),
                    deleted: progress.deleted.load(Ordering::Relaxed),
                });
            }
        })
    };

    let mut errors = Vec::new();
    while started.elapsed() < args.duration {
        let mut c = churn.lock().await;
        let result = c.cycle(&agent, args.rounds).await;
        eprintln!(
            "soak: {:>5.1} min: cycle {} done, {} pods created, {} deleted",
            started.elapsed().as_secs_f64() / 60.0,
            c.counts.cycles,
            c.counts.created,
            c.counts.deleted
        );
        if let Err(e) = result {
            eprintln!("soak: cycle {}: {e:#}", c.counts.cycles + 1);
            errors.push(format!("{e:#}"));
            // A cycle that left pods behind would skew every later one: stop here.
            if e.to_string().contains("still there") {
                break;
            }
        }
    }
    sampler.abort();
    // Its clone of the agent goes with it, so the agent is stopped when dropped below.
    let _ = sampler.await;
    let counts = churn.lock().await.counts;
    let left = churn
        .lock()
        .await
        .ns
        .pods()
        .list(&Default::default())
        .await
        .map(|l| l.items.len())
        .unwrap_or(usize::MAX);
    let elapsed = started.elapsed();
    let rows = rows.lock().await.clone();
    let summary = summarize(&rows, counts, left, elapsed, &errors, &args);
    std::fs::create_dir_all(&args.out)?;
    write_csv(&args.out.join(format!("{}.csv", args.name)), &rows)?;
    std::fs::write(
        args.out.join(format!("{}.json", args.name)),
        serde_json::to_string_pretty(&serde_json::json!({
            "summary": summary,
            "series": rows.iter().map(row_json).collect::<Vec<_>>(),
        }))?,
    )?;
    plot(
        &args.out.join(format!("{}.svg", args.name)),
        &rows,
        &args.name,
    )?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    drop(churn);
    drop(agent);
    if left != 0 || !errors.is_empty() {
        bail!("{left} pods left, {} cycles with errors", errors.len());
    }
    Ok(())
}

fn row_json(r: &Row) -> serde_json::Value {
    serde_json::json!({
        "seconds": r.seconds.round(),
        "agent_rss_bytes": r.sample.agent.rss_bytes,
        "agent_fds": r.sample.agent.fds,
        "agent_threads": r.sample.agent.threads,
        "agent_tokio_tasks": r.sample.tasks,
        "runtime_rss_bytes": r.sample.runtime.map(|s| s.rss_bytes),
        "runtime_fds": r.sample.runtime.map(|s| s.fds),
        "runtime_threads": r.sample.runtime.map(|s| s.threads),
        "pods_created": r.created,
        "pods_deleted": r.deleted,
    })
}

fn write_csv(path: &std::path::Path, rows: &[Row]) -> anyhow::Result<()> {
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    let mut text = String::from("seconds,agent_rss_bytes,agent_fds,agent_threads,agent_tokio_tasks,runtime_rss_bytes,runtime_fds,runtime_threads,pods_created,pods_deleted\n");
    for r in rows {
        let s = &r.sample;
        text.push_str(&format!(
            "{:.0},{},{},{},{},{},{},{},{},{}\n",
            r.seconds,
            s.agent.rss_bytes,
            s.agent.fds,
            s.agent.threads,
            opt(s.tasks),
            opt(s.runtime.map(|r| r.rss_bytes)),
            opt(s.runtime.map(|r| r.fds)),
            opt(s.runtime.map(|r| r.threads)),
            r.created,
            r.deleted
        ));
    }
    std::fs::write(path, text)?;
    Ok(())
}

/// The series of one quantity, (hours, value), leaving out the first `skip` (warm-up).
fn series(rows: &[Row], skip: usize, f: impl Fn(&AgentSample) -> Option<f64>) -> Vec<(f64, f64)> {
    rows.iter()
        .skip(skip)
        .filter_map(|r| Some((r.seconds / 3600.0, f(&r.sample)?)))
        .collect()
}

fn summarize(
    rows: &[Row],
    counts: integration_tests::soak::Counts,
    left: usize,
    elapsed: Duration,
    errors: &[String],
    args: &Args,
) -> serde_json::Value {
    // The first minute is warm-up (images pulled and compiled, pools filled): the slopes are
    // over the rest.
    let skip = (60.0 / SAMPLE_EVERY.as_secs_f64()) as usize;
    let per_hour = |f: &dyn Fn(&AgentSample) -> Option<f64>| slope(&series(rows, skip, f));
    let mib = 1024.0 * 1024.0;
    let first = rows.get(skip).or(rows.first());
    let last = rows.last();
    let minutes = elapsed.as_secs_f64() / 60.0;
    serde_json::json!({
        "name": args.name,
        "minutes": (minutes * 10.0).round() / 10.0,
        "pods_per_cycle": args.rounds * KINDS.len(),
        "cycles": counts.cycles,
        "pods_created": counts.created,
        "pods_deleted": counts.deleted,
        "pods_per_minute": ((counts.created as f64 / minutes) * 10.0).round() / 10.0,
        "pods_left": left,
        "stuck_or_failed": errors,
        "samples": rows.len(),
        "slopes_per_hour_after_first_minute": {
            "agent_rss_mib": per_hour(&|s| Some(s.agent.rss_bytes as f64 / mib)),
            "agent_fds": per_hour(&|s| Some(s.agent.fds as f64)),
            "agent_threads": per_hour(&|s| Some(s.agent.threads as f64)),
            "agent_tokio_tasks": per_hour(&|s| s.tasks.map(|t| t as f64)),
            "runtime_rss_mib": per_hour(&|s| s.runtime.map(|r| r.rss_bytes as f64 / mib)),
            "runtime_fds": per_hour(&|s| s.runtime.map(|r| r.fds as f64)),
            "runtime_threads": per_hour(&|s| s.runtime.map(|r| r.threads as f64)),
        },
        "first_after_warmup": first.map(row_json),
        "last": last.map(row_json),
    })
}

/// Four panels over minutes: RSS (MiB), fds, threads (agent and runtime), tokio tasks.
fn plot(path: &std::path::Path, rows: &[Row], name: &str) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(name, ("sans-serif", 22))?;
    let panels = root.split_evenly((2, 2));
    let minutes = |r: &Row| r.seconds / 60.0;
    let x_max = rows.last().map_or(1.0, minutes).max(1.0);
    let mib = 1024.0 * 1024.0;
    type Line<'a> = (
        &'a str,
        RGBColor,
        Box<dyn Fn(&AgentSample) -> Option<f64> + 'a>,
    );
    let charts: [(&str, Vec<Line>); 4] = [
        (
            "RSS (MiB)",
            vec![
                (
                    "agent",
                    BLUE,
                    Box::new(|s: &AgentSample| Some(s.agent.rss_bytes as f64 / mib)),
                ),
                (
                    "runtime",
                    RED,
                    Box::new(|s: &AgentSample| s.runtime.map(|r| r.rss_bytes as f64 / mib)),
                ),
            ],
        ),
        (
            "open fds",
            vec![
                (
                    "agent",
                    BLUE,
                    Box::new(|s: &AgentSample| Some(s.agent.fds as f64)),
                ),
                (
                    "runtime",
                    RED,
                    Box::new(|s: &AgentSample| s.runtime.map(|r| r.fds as f64)),
                ),
            ],
        ),
        (
            "threads",
            vec![
                (
                    "agent",
                    BLUE,
                    Box::new(|s: &AgentSample| Some(s.agent.threads as f64)),
                ),
                (
                    "runtime",
                    RED,
                    Box::new(|s: &AgentSample| s.runtime.map(|r| r.threads as f64)),
                ),
            ],
        ),
        (
            "agent tokio tasks",
            vec![(
                "agent",
                BLUE,
                Box::new(|s: &AgentSample| s.tasks.map(|t| t as f64)),
            )],
        ),
    ];
    for (area, (title, lines)) in panels.iter().zip(charts) {
        let y_max = lines
            .iter()
            .flat_map(|(_, _, f)| rows.iter().filter_map(|r| f(&r.sample)))
            .fold(1.0f64, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart.configure_mesh().x_desc("minutes").draw()?;
        for (label, color, f) in &lines {
            let points: Vec<(f64, f64)> = rows
                .iter()
                .filter_map(|r| Some((minutes(r), f(&r.sample)?)))
                .collect();
            let color = *color;
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(*label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
