//! `pegaflow-trace` as a user runs it: synthesize a trace, replay it under each policy,
//! read the JSON last line.

#![allow(clippy::unwrap_used)] // a test crate: helpers panic on setup failure

use std::io::Write;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_pegaflow-trace");

fn replay(args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        // A run refused before it reads its input closes the pipe: that is its answer.
        let written = child.stdin.take().unwrap().write_all(input);
        assert!(written.is_ok() || written.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn replays_a_synthetic_trace_under_every_policy_and_opt_bounds_them() {
    let dir = std::env::temp_dir().join(format!("pegaflow-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("synth.jsonl");
    let trace_arg = trace.to_str().unwrap();
    let (code, _, err) = replay(&["synth", "--requests", "3000", "--conversations", "500", "--out", trace_arg], None);
    assert_eq!(code, 0, "{err}");
    let mut ratios = std::collections::HashMap::new();
    for policy in ["lru", "tinylfu", "opt"] {
        let (code, out, err) = replay(&["--trace", trace_arg, "--policy", policy, "--capacity-fraction", "0.1"], None);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("block hit ratio"), "a human summary first: {out}");
        let report = last_json(&out);
        for key in ["block_hit_ratio", "prefix_token_hit_ratio", "admissions_rejected", "evictions", "queries_per_s"] {
            assert!(report.get(key).is_some(), "{key} missing from {report}");
        }
        assert_eq!(report["policy"], policy);
        let ratio = report["block_hit_ratio"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&ratio));
        ratios.insert(policy, ratio);
    }
    assert!(ratios["opt"] >= ratios["lru"] && ratios["opt"] >= ratios["tinylfu"], "{ratios:?}");
    assert!(ratios["lru"] > 0.05, "the trace has reuse: {ratios:?}");
    // The same trace from standard input, with a block-count capacity.
    let bytes = std::fs::read(&trace).unwrap();
    let (code, out, err) = replay(&["--trace", "-", "--policy", "lru", "--capacity-blocks", "1000"], Some(&bytes));
    assert_eq!(code, 0, "{err}");
    assert_eq!(last_json(&out)["capacity_blocks"], 1000);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_fails_clearly() {
    let (code, _, err) =
        replay(&["--trace", "-", "--policy", "lru", "--capacity-blocks", "10"], Some(b"{\"hash_ids\": [1]}\n"));
    assert_eq!(code, 1);
    assert!(err.contains("line 1"), "{err}");
    let (code, _, err) = replay(&["--trace", "-", "--policy", "lru"], Some(b""));
    assert_eq!(code, 2, "a capacity is required: {err}");
    let (code, _, err) =
        replay(&["--trace", "-", "--policy", "lru", "--capacity-blocks", "5", "--capacity-fraction", "0.5"], None);
    assert_eq!(code, 2, "one capacity, not two: {err}");
    let (code, _, err) = replay(&["--trace", "-", "--policy", "mru", "--capacity-blocks", "5"], None);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = replay(&["--trace", "-", "--policy", "lru", "--capacity-fraction=-1"], Some(b"{}"));
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = replay(&["--trace", "/nonexistent/trace", "--policy", "opt", "--capacity-blocks", "5"], None);
    assert_eq!(code, 1);
    assert!(err.contains("cannot"), "{err}");
}

#[test]
fn an_ssd_tier_adds_hits_and_each_write_policy_writes_what_it_says() {
    let dir = std::env::temp_dir().join(format!("pegaflow-trace-ssd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("synth.jsonl");
    let trace_arg = trace.to_str().unwrap();
    let (code, _, err) = replay(&["synth", "--requests", "3000", "--conversations", "500", "--out", trace_arg], None);
    assert_eq!(code, 0, "{err}");
    let base = ["--trace", trace_arg, "--policy", "tinylfu", "--capacity-fraction", "0.05"];
    let (code, out, err) = replay(&base, None);
    assert_eq!(code, 0, "{err}");
    let ram_only = last_json(&out);
    assert_eq!(ram_only["ssd_hit_blocks"], 0);
    let mut written = Vec::new();
    for writes in ["on-save", "on-evict", "second-use"] {
        let args: Vec<&str> =
            base.iter().copied().chain(["--ssd-capacity-fraction", "0.5", "--ssd-writes", writes]).collect();
        let (code, out, err) = replay(&args, None);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("SSD of"), "{out}");
        let report = last_json(&out);
        assert_eq!(report["ssd_writes"], writes);
        let hits = report["ssd_hit_blocks"].as_u64().unwrap();
        assert!(hits > 0, "{writes}: the SSD serves hits the cache lost");
        assert!(report["block_hit_ratio"].as_f64().unwrap() > ram_only["block_hit_ratio"].as_f64().unwrap());
        written.push(report["ssd_written_blocks"].as_u64().unwrap());
    }
    assert!(written[0] >= written[1] && written[1] >= written[2], "on-save ≥ on-evict ≥ second-use: {written:?}");
    let (code, _, err) = replay(&[&base[..], &["--ssd-capacity-fraction=-1"]].concat(), None);
    assert_eq!(code, 1, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
