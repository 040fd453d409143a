//! Health checks of a container, run by its node's agent: readiness decides `status.ready`
//! (what rollouts wait for), liveness restarts a container that stopped answering.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validate::{self, ValidationError};

/// One check and how often to run it. Exactly one of `exec`, `http`, `tcp`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// Run a command in the container: exit code 0 passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecCheck>,
    /// `GET` a path on a port of the container: a status of 200 to 399 passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// Open a TCP connection to a port of the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheck>,
    /// Seconds between checks (1 to 3600, default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_secs: Option<u32>,
    /// Seconds one check may take (1 to 60, default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
    /// Seconds after the container starts before the first check (0 to 3600, default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay_secs: Option<u32>,
    /// Failed checks in a row that make it fail (1 to 100, default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
    /// Passed checks in a row that make it pass again (1 to 100, default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_threshold: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecCheck {
    /// argv, run with the container's environment (at most 64 arguments).
    pub command: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    pub port: u16,
    /// Default `/`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {
    pub port: u16,
}

/// The check a probe runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check<'a> {
    Exec(&'a [String]),
    Http { port: u16, path: &'a str },
    Tcp { port: u16 },
}

impl Probe {
    pub fn check(&self) -> Option<Check<'_>> {
        match (&self.exec, &self.http, &self.tcp) {
            (Some(e), None, None) => Some(Check::Exec(&e.command)),
            (None, Some(h), None) => Some(Check::Http {
                port: h.port,
                path: if h.path.is_empty() { "/" } else { &h.path },
            }),
            (None, None, Some(t)) => Some(Check::Tcp { port: t.port }),
            _ => None,
        }
    }

    pub fn period_secs(&self) -> u32 {
        self.period_secs.unwrap_or(10)
    }
    pub fn timeout_secs(&self) -> u32 {
        self.timeout_secs.unwrap_or(1)
    }
    pub fn initial_delay_secs(&self) -> u32 {
        self.initial_delay_secs.unwrap_or(0)
    }
    pub fn failure_threshold(&self) -> u32 {
        self.failure_threshold.unwrap_or(3)
    }
    pub fn success_threshold(&self) -> u32 {
        self.success_threshold.unwrap_or(1)
    }

    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        let check = self
            .check()
            .ok_or_else(|| ValidationError::new(field, "give exactly one of exec, http or tcp"))?;
        match check {
            Check::Exec(cmd) => {
                let f = format!("{field}.exec.command");
                if cmd.is_empty() {
                    return Err(ValidationError::new(f, "must name a program"));
                }
                validate::count(&f, cmd, 64)?;
                for (i, a) in cmd.iter().enumerate() {
                    validate::kernel_string(&format!("{f}[{i}]"), a, 4096)?;
                }
            }
            Check::Http { port, path } => {
                port_ok(&format!("{field}.http.port"), port)?;
                let f = format!("{field}.http.path");
                validate::kernel_string(&f, path, 1024)?;
                if !path.starts_with('/')
                    || path.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(ValidationError::new(
                        f,
                        format!("{path:?} must start with / and hold no spaces"),
                    ));
                }
            }
            Check::Tcp { port } => port_ok(&format!("{field}.tcp.port"), port)?,
        }
        for (name, v, lo, hi) in [
            ("period_secs", self.period_secs, 1, 3600),
            ("timeout_secs", self.timeout_secs, 1, 60),
            ("initial_delay_secs", self.initial_delay_secs, 0, 3600),
            ("failure_threshold", self.failure_threshold, 1, 100),
            ("success_threshold", self.success_threshold, 1, 100),
        ] {
            if let Some(v) = v
                && !(lo..=hi).contains(&v)
            {
                return Err(ValidationError::new(
                    format!("{field}.{name}"),
                    format!("{v} is outside {lo} to {hi}"),
                ));
            }
        }
        Ok(())
    }
}

fn port_ok(field: &str, port: u16) -> Result<(), ValidationError> {
    if port == 0 {
        return Err(ValidationError::new(field, "0 is not a port"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(json: &str) -> Result<Probe, String> {
        let p: Probe = serde_json::from_str(json).map_err(|e| e.to_string())?;
        p.validate("p").map_err(|e| e.to_string())?;
        Ok(p)
    }

    #[test]
    fn one_check_with_bounded_timing() {
        let p = probe(r#"{"http":{"port":80},"period_secs":2}"#).unwrap();
        assert_eq!(
            p.check(),
            Some(Check::Http {
                port: 80,
                path: "/"
            })
        );
        assert_eq!(
            (p.period_secs(), p.timeout_secs(), p.failure_threshold()),
            (2, 1, 3)
        );
        assert!(probe(r#"{"tcp":{"port":5432}}"#).is_ok());
        assert!(probe(r#"{"exec":{"command":["true"]}}"#).is_ok());
        for (bad, says) in [
            (r#"{}"#, "exactly one"),
            (r#"{"tcp":{"port":1},"http":{"port":2}}"#, "exactly one"),
            (r#"{"tcp":{"port":0}}"#, "p.tcp.port"),
            (r#"{"exec":{"command":[]}}"#, "p.exec.command"),
            (r#"{"http":{"port":80,"path":"no-slash"}}"#, "p.http.path"),
            (r#"{"http":{"port":80,"path":"/a b"}}"#, "p.http.path"),
            (r#"{"tcp":{"port":1},"period_secs":0}"#, "p.period_secs"),
            (r#"{"tcp":{"port":1},"timeout_secs":61}"#, "p.timeout_secs"),
            (r#"{"tcp":{"port":1},"colour":1}"#, "unknown field"),
            (r#"{"tcp":{"port":70000}}"#, "70000"),
        ] {
            let e = probe(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
