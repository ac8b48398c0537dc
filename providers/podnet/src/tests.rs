//! The CNI seam with fake plugins: small shell scripts that record their environment, their
//! stdin and the order of calls, and print a canned result or error.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{Conflist, PluginRunner, PodNetError, PodNetwork, PodRef, PortMapping, CNI_VERSION};

const FAKE: &str = r#"#!/bin/sh
d=$(dirname "$0"); n=$(basename "$0")
echo "$n $CNI_COMMAND $CNI_IFNAME" >> "$d/calls"
env > "$d/$n.$CNI_COMMAND.$CNI_IFNAME.env"
cat > "$d/$n.$CNI_COMMAND.$CNI_IFNAME.stdin"
if [ -f "$d/$n.fail" ]; then cat "$d/$n.fail"; exit 3; fi
if [ -f "$d/$n.hang" ]; then exec sleep 600; fi
if [ "$CNI_COMMAND" = ADD ]; then cat "$d/$n.result"; fi
"#;

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("podnet-unit-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        let src = dir.join("fake.sh");
        fs::write(&src, FAKE).unwrap();
        for plugin in ["loopback", "fakebridge", "fakeportmap"] {
            // Installed by a child process: this (multi-threaded) test process never holds a
            // writable descriptor of a file it then executes (ETXTBSY on a concurrent fork).
            let dst = dir.join("bin").join(plugin);
            let ok = Command::new("install")
                .arg("-m755")
                .arg(&src)
                .arg(&dst)
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let f = Fixture { dir };
        f.result(
            "loopback",
            json!({
                "cniVersion": CNI_VERSION,
                "interfaces": [{ "name": "lo", "mac": "00:00:00:00:00:00", "sandbox": "/ns/net" }],
                "ips": [{ "interface": 0, "address": "127.0.0.1/8" }],
            }),
        );
        f.result("fakebridge", bridge_result());
        let mut portmapped = bridge_result();
        portmapped["portmapped"] = json!(true);
        f.result("fakeportmap", portmapped);
        f
    }

    fn bin(&self) -> PathBuf {
        self.dir.join("bin")
    }

    fn result(&self, plugin: &str, value: Value) {
        fs::write(
            self.bin().join(format!("{plugin}.result")),
            value.to_string(),
        )
        .unwrap();
    }

    fn network(&self, name: &str) -> PodNetwork {
        PodNetwork::new(conflist(name), self.runner(), self.dir.join("state"))
    }

    fn runner(&self) -> PluginRunner {
        PluginRunner {
            plugin_dirs: vec![self.dir.join("nothing-here"), self.bin()],
            timeout: Duration::from_secs(60),
        }
    }

    fn calls(&self) -> Vec<String> {
        match fs::read_to_string(self.bin().join("calls")) {
            Ok(s) => s.lines().map(str::to_owned).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn env(&self, plugin: &str, command: &str, ifname: &str) -> BTreeMap<String, String> {
        let text = fs::read_to_string(self.bin().join(format!("{plugin}.{command}.{ifname}.env")))
            .unwrap();
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn stdin(&self, plugin: &str, command: &str, ifname: &str) -> Value {
        let path = self
            .bin()
            .join(format!("{plugin}.{command}.{ifname}.stdin"));
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn bridge_result() -> Value {
    json!({
        "cniVersion": CNI_VERSION,
        "interfaces": [
            { "name": "fbr0", "mac": "aa:aa:aa:aa:aa:aa" },
            { "name": "veth1234", "mac": "bb:bb:bb:bb:bb:bb" },
            { "name": "eth0", "mac": "cc:cc:cc:cc:cc:cc", "sandbox": "/ns/net" }
        ],
        "ips": [{ "interface": 2, "address": "10.9.0.5/24", "gateway": "10.9.0.1" }],
    })
}

fn conflist(name: &str) -> Conflist {
    let raw = json!({
        "cniVersion": CNI_VERSION,
        "name": name,
        "plugins": [
            { "type": "fakebridge", "bridge": "fbr0" },
            { "type": "fakeportmap", "capabilities": { "portMappings": true } },
        ],
    });
    Conflist::from_json(raw.to_string().as_bytes(), None).unwrap()
}

fn pod() -> PodRef {
    PodRef {
        uid: "0b8e4c8a-1c2d-4e5f-8a9b-0c1d2e3f4a5b".into(),
        namespace: "team-a".into(),
        name: "web".into(),
    }
}

fn ports() -> Vec<PortMapping> {
    vec![PortMapping {
        host_port: 8080,
        container_port: 80,
        protocol: "tcp".into(),
        host_ip: None,
    }]
}

#[tokio::test]
async fn add_sets_the_cni_environment_and_nothing_else() {
    let f = Fixture::new("env");
    let net = f.network("podnet");
    let got = net
        .setup(&pod(), Path::new("/ns/net"), &ports())
        .await
        .unwrap();
    assert_eq!(
        got.ips,
        vec!["10.9.0.5".parse::<std::net::IpAddr>().unwrap()]
    );

    let env = f.env("fakebridge", "ADD", "eth0");
    let want_path = format!(
        "{}:{}",
        f.dir.join("nothing-here").display(),
        f.bin().display()
    );
    assert_eq!(env["CNI_COMMAND"], "ADD");
    assert_eq!(env["CNI_CONTAINERID"], pod().uid);
    assert_eq!(env["CNI_NETNS"], "/ns/net");
    assert_eq!(env["CNI_IFNAME"], "eth0");
    assert_eq!(env["CNI_PATH"], want_path);
    assert_eq!(
        env["CNI_ARGS"],
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID={0};K8S_POD_UID={0}",
            pod().uid
        )
    );
    // The agent's own environment does not reach the plugin (only PATH, and what sh adds).
    let allowed = ["PATH", "PWD", "SHLVL", "_", "OLDPWD"];
    for key in env.keys() {
        assert!(
            key.starts_with("CNI_") || allowed.contains(&key.as_str()),
            "leaked {key}"
        );
    }
    // lo is brought up by the loopback plugin with CNI_IFNAME=lo.
    assert_eq!(f.env("loopback", "ADD", "lo")["CNI_IFNAME"], "lo");
}

#[tokio::test]
async fn the_chain_passes_prev_result_and_capability_args_and_del_runs_in_reverse() {
    let f = Fixture::new("chain");
    let net = f.network("podnet");
    net.setup(&pod(), Path::new("/ns/net"), &ports())
        .await
        .unwrap();

    let bridge_in = f.stdin("fakebridge", "ADD", "eth0");
    assert_eq!(bridge_in["name"], "podnet");
    assert_eq!(bridge_in["cniVersion"], CNI_VERSION);
    assert_eq!(bridge_in["bridge"], "fbr0");
    assert!(bridge_in.get("prevResult").is_none());
    assert!(
        bridge_in.get("runtimeConfig").is_none(),
        "bridge declares no capabilities"
    );

    let portmap_in = f.stdin("fakeportmap", "ADD", "eth0");
    assert_eq!(portmap_in["prevResult"], bridge_result());
    assert_eq!(
        portmap_in["runtimeConfig"],
        json!({ "portMappings": [{ "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }] })
    );

    net.teardown(&pod().uid).await.unwrap();
    assert_eq!(
        f.calls(),
        [
            "loopback ADD lo",
            "fakebridge ADD eth0",
            "fakeportmap ADD eth0",
            "fakeportmap DEL eth0",
            "fakebridge DEL eth0",
            "loopback DEL lo",
        ]
    );
    // DEL gets the final ADD result (portmap's) and the same capability arguments.
    let del_in = f.stdin("fakeportmap", "DEL", "eth0");
    assert_eq!(del_in["prevResult"]["portmapped"], true);
    assert_eq!(del_in["runtimeConfig"], portmap_in["runtimeConfig"]);
    assert_eq!(
        f.stdin("fakebridge", "DEL", "eth0")["prevResult"]["portmapped"],
        true
    );
    // Detached: a second teardown runs nothing.
    net.teardown(&pod().uid).await.unwrap();
    assert_eq!(f.calls().len(), 6);
}

#[tokio::test]
async fn a_plugin_error_is_typed_with_its_message_and_add_is_undone() {
    let f = Fixture::new("error");
    fs::write(
        f.bin().join("fakeportmap.fail"),
        r#"{"cniVersion":"1.0.0","code":7,"msg":"invalid port mapping","details":"hostPort 8080 taken"}"#,
    )
    .unwrap();
    let net = f.network("podnet");
    let err = net
        .setup(&pod(), Path::new("/ns/net"), &ports())
        .await
        .unwrap_err();
    match &err {
        PodNetError::Plugin {
            plugin,
            code,
            msg,
            details,
            exit_code,
            ..
        } => {
            assert_eq!(plugin, "fakeportmap");
            assert_eq!(
                (*code, msg.as_str(), details.as_str()),
                (7, "invalid port mapping", "hostPort 8080 taken")
            );
            assert_eq!(*exit_code, Some(3));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("invalid port mapping"), "{err}");
    // The failed ADD was followed by DEL of the chain. fakeportmap's DEL fails too (its fail
    // file), so the record stays for the next teardown to retry.
    let calls = f.calls();
    assert!(
        calls.contains(&"fakeportmap DEL eth0".to_string()),
        "{calls:?}"
    );
    fs::remove_file(f.bin().join("fakeportmap.fail")).unwrap();
    net.teardown(&pod().uid).await.unwrap();
    assert!(f
        .calls()
        .ends_with(&["fakebridge DEL eth0".into(), "loopback DEL lo".into()]));
    assert!(net.addresses_of(&pod()).unwrap().is_none());
}

#[tokio::test]
async fn a_missing_plugin_and_a_hung_plugin_are_errors_not_hangs() {
    let f = Fixture::new("missing");
    let raw = json!({ "cniVersion": CNI_VERSION, "name": "n", "plugins": [{ "type": "nosuch" }] });
    let list = Conflist::from_json(raw.to_string().as_bytes(), None).unwrap();
    let net = PodNetwork::new(list, f.runner(), f.dir.join("state"));
    let err = net
        .setup(&pod(), Path::new("/ns/net"), &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, PodNetError::PluginNotFound { ref plugin, .. } if plugin == "nosuch"),
        "{err}"
    );

    fs::write(f.bin().join("fakebridge.hang"), "").unwrap();
    let runner = PluginRunner {
        timeout: Duration::from_millis(300),
        ..f.runner()
    };
    let net = PodNetwork::new(conflist("podnet"), runner, f.dir.join("state2"));
    let err = net
        .setup(&pod(), Path::new("/ns/net"), &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, PodNetError::PluginTimeout { ref plugin, .. } if plugin == "fakebridge"),
        "{err}"
    );
}

#[tokio::test]
async fn after_a_restart_del_uses_the_recorded_config() {
    let f = Fixture::new("restart");
    let before = f.network("podnet-old");
    let added = before
        .setup(&pod(), Path::new("/ns/net"), &ports())
        .await
        .unwrap();
    drop(before);

    // The node restarted with another conflist: the pod keeps its addresses, and DEL is given
    // the configuration its ADD used (the CNI spec requires the same config for DEL).
    let after = f.network("podnet-new");
    assert_eq!(after.addresses_of(&pod()).unwrap().unwrap(), added);
    // setup of an attached pod answers from the record without running plugins again.
    let calls = f.calls().len();
    assert_eq!(
        after
            .setup(&pod(), Path::new("/ns/net"), &ports())
            .await
            .unwrap(),
        added
    );
    assert_eq!(f.calls().len(), calls);
    after.check(&pod().uid).await.unwrap();
    assert_eq!(f.stdin("fakebridge", "CHECK", "eth0")["name"], "podnet-old");
    after.teardown(&pod().uid).await.unwrap();
    assert_eq!(f.stdin("fakebridge", "DEL", "eth0")["name"], "podnet-old");
    assert!(matches!(
        after.check(&pod().uid).await,
        Err(PodNetError::NotAttached { .. })
    ));
}

#[tokio::test]
async fn hostile_pod_names_never_reach_cni_args() {
    let f = Fixture::new("hostile");
    let net = f.network("podnet");
    let bad = PodRef {
        name: "web;K8S_POD_UID=other".into(),
        ..pod()
    };
    assert!(matches!(
        net.setup(&bad, Path::new("/ns/net"), &[]).await,
        Err(PodNetError::Invalid { .. })
    ));
    let escape = PodRef {
        uid: "../../etc/x".into(),
        ..pod()
    };
    assert!(matches!(
        net.setup(&escape, Path::new("/ns/net"), &[]).await,
        Err(PodNetError::Invalid { .. })
    ));
    assert!(f.calls().is_empty());
}
