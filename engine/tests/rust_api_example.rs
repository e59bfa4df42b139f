//! Runs the compiled `rust_api` example (cargo builds examples for `cargo test`) and checks
//! what it printed.

use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/<name>
    let mut p = std::env::current_exe().unwrap();
    p.pop();
    p.pop();
    p.push("examples");
    p.push(name);
    {
        // `cargo test --workspace` builds examples, a filtered run may not have, and a
        // stale binary would test old code: ask cargo (a no-op when it is up to date).
        let profile_release = p.components().any(|c| c.as_os_str() == "release");
        let mut cargo = Command::new(env!("CARGO"));
        // --workspace: the same feature resolution as `cargo test`, so nothing is rebuilt.
        cargo.args(["build", "--workspace", "--example", name]);
        if profile_release {
            cargo.arg("--release");
        }
        let status = cargo.status().unwrap();
        assert!(status.success(), "building the example failed");
    }
    assert!(p.exists(), "{} was not built", p.display());
    p
}

#[test]
fn the_rust_api_example_counts_and_rejects() {
    let out = Command::new(example("rust_api"))
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let summary = text.lines().last().unwrap();
    assert!(summary.starts_with("results: "), "{text}");
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(first["user_id"].as_str().unwrap().starts_with("User"));
    assert!(first["count"].as_u64().unwrap() > 0);
    // About a quarter of the generated user agents are Opera: they were dead-lettered.
    let dead: u64 = summary
        .split(" + ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((300..700).contains(&dead), "{summary}");
    assert!(summary.contains("2000 in"), "{summary}");
}
