//! Rank discovery from torchrun/Slurm variables, and the timeout variable.

use alignment_distributed::env::{timeout_from_value, DEFAULT_MASTER_PORT, DEFAULT_TIMEOUT};
use alignment_distributed::{DistEnv, DistError};
use std::collections::HashMap;
use std::time::Duration;

fn parse(vars: &[(&str, &str)]) -> Result<Option<DistEnv>, DistError> {
    let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    DistEnv::from_vars(|name| map.get(name).cloned())
}

fn error(vars: &[(&str, &str)]) -> String {
    parse(vars).expect_err("should fail").to_string()
}

const TORCHRUN: [(&str, &str); 5] =
    [("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "node0"), ("MASTER_PORT", "1234")];

#[test]
fn torchrun_variables() {
    let env = parse(&TORCHRUN).unwrap().unwrap();
    assert_eq!(env, DistEnv { rank: 1, world_size: 4, local_rank: 1, master_addr: "node0".into(), master_port: 1234 });
    assert!(!env.is_main());
    assert_eq!(env.master(), "node0:1234");
}

#[test]
fn slurm_variables_and_default_port() {
    let env =
        parse(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "5"), ("MASTER_ADDR", "10.0.0.1")]).unwrap().unwrap();
    assert_eq!((env.rank, env.world_size, env.local_rank, env.master_port), (5, 16, 5, DEFAULT_MASTER_PORT));
}

#[test]
fn torchrun_takes_precedence_over_slurm() {
    let mut vars = TORCHRUN.to_vec();
    vars.extend([("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("SLURM_LOCALID", "0")]);
    assert_eq!(parse(&vars).unwrap().unwrap().rank, 1);
}

#[test]
fn single_process_is_not_distributed() {
    assert_eq!(parse(&[]).unwrap(), None);
    assert_eq!(parse(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
    assert_eq!(parse(&[("SLURM_NTASKS", "1")]).unwrap(), None);
}

#[test]
fn malformed_values_name_the_variable() {
    let with = |var: &str, value: &str| -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = TORCHRUN.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        vars.retain(|(k, _)| k != var);
        if !value.is_empty() {
            vars.push((var.to_string(), value.to_string()));
        }
        vars
    };
    let err = |var: &str, value: &str| {
        let vars = with(var, value);
        let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        error(&refs)
    };
    assert!(err("WORLD_SIZE", "four").contains("WORLD_SIZE=\"four\" is invalid: expected a non-negative integer"));
    assert!(err("WORLD_SIZE", "0").contains("at least 1"));
    assert!(err("RANK", "4").contains("RANK=\"4\" is invalid: rank must be below the world size 4"));
    assert!(err("RANK", "-1").contains("RANK=\"-1\""));
    assert!(err("RANK", "").contains("RANK=\"\" is invalid: not set"));
    assert!(err("LOCAL_RANK", "").contains("LOCAL_RANK"));
    assert!(err("MASTER_ADDR", "").contains("MASTER_ADDR=\"\" is invalid: not set"));
    assert!(err("MASTER_PORT", "70000").contains("MASTER_PORT=\"70000\" is invalid"));
    assert!(err("MASTER_PORT", "0").contains("MASTER_PORT=\"0\""));
    assert!(error(&[("WORLD_SIZE", "1"), ("RANK", "1")]).contains("RANK=\"1\""));
}

#[test]
fn timeout_variable() {
    assert_eq!(timeout_from_value(None).unwrap(), DEFAULT_TIMEOUT);
    assert_eq!(timeout_from_value(Some("2.5")).unwrap(), Duration::from_millis(2500));
    for bad in ["0", "-1", "soon", "inf"] {
        let message = timeout_from_value(Some(bad)).unwrap_err().to_string();
        assert!(message.contains("ALIGNMENT_DIST_TIMEOUT_S"), "{message}");
    }
}
