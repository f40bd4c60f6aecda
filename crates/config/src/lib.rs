//! Typed configuration read from environment variables.
//!
//! Every service parses its config through [`Env`] rather than `std::env`, so tests hand it a map
//! and never mutate the process environment, and [`Recorder`] can list exactly which variables a
//! service reads (the deploy manifests are checked against that list).

use std::{
    cell::RefCell,
    collections::{BTreeSet, HashMap},
    fmt,
    num::NonZeroUsize,
    str::FromStr,
    time::Duration,
};

/// A source of configuration variables.
pub trait Env {
    /// The value of `name`, if set. An empty value counts as unset, as in most deploy tooling.
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Env for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).filter(|v| !v.is_empty()).cloned()
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn get(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
            .filter(|v| !v.is_empty())
    }
}

impl Env for &[(&str, &str)] {
    fn get(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
            .filter(|v| !v.is_empty())
    }
}

impl<E: Env + ?Sized> Env for &E {
    fn get(&self, name: &str) -> Option<String> {
        (**self).get(name)
    }
}

/// Wraps an [`Env`] and remembers every variable name asked for.
///
/// Parsing a service's config through it yields the variables that service reads, derived from
/// the code itself rather than from a hand-kept list.
#[derive(Debug, Default)]
pub struct Recorder<E> {
    inner: E,
    seen: RefCell<BTreeSet<String>>,
}

impl<E: Env> Recorder<E> {
    /// Records lookups made against `inner`.
    pub fn new(inner: E) -> Self {
        Self {
            inner,
            seen: RefCell::default(),
        }
    }

    /// Every variable name looked up so far, sorted.
    pub fn seen(&self) -> BTreeSet<String> {
        self.seen.borrow().clone()
    }
}

impl<E: Env> Env for Recorder<E> {
    fn get(&self, name: &str) -> Option<String> {
        self.seen.borrow_mut().insert(name.to_string());
        self.inner.get(name)
    }
}

/// A configuration variable that is missing or cannot be used; it names the variable and value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is not set.
    #[error("{var} is required but not set")]
    Missing {
        /// The variable's name.
        var: &'static str,
    },
    /// A variable is set to something unusable.
    #[error("{var}={value:?} is invalid: {reason}")]
    Invalid {
        /// The variable's name.
        var: &'static str,
        /// The value as given.
        value: String,
        /// Why it was refused.
        reason: String,
    },
}

impl ConfigError {
    /// A refusal of `value` for `var`.
    pub fn invalid(var: &'static str, value: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self::Invalid {
            var,
            value: value.into(),
            reason: reason.to_string(),
        }
    }
}

/// The value of `var`, or [`ConfigError::Missing`].
pub fn required(env: &impl Env, var: &'static str) -> Result<String, ConfigError> {
    env.get(var).ok_or(ConfigError::Missing { var })
}

/// `var` parsed with [`FromStr`], or `default` when unset.
pub fn parse_or<T>(env: &impl Env, var: &'static str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    match env.get(var) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|e| ConfigError::invalid(var, v, e)),
    }
}

/// `var` as a positive count, or one per core this process may use (its CPU quota, where the
/// container has one) when unset.
pub fn count_or_cores(env: &impl Env, var: &'static str) -> Result<NonZeroUsize, ConfigError> {
    let cores = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
    parse_or(env, var, cores)
}

/// `var` as a human duration (`10s`, `250ms`, `1m`), or `default` when unset.
pub fn duration_or(
    env: &impl Env,
    var: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match env.get(var) {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v.trim()).map_err(|e| ConfigError::invalid(var, v, e)),
    }
}

/// `var` as a comma-separated list, items trimmed, empty items dropped; empty when unset.
pub fn list(env: &impl Env, var: &'static str) -> Vec<String> {
    env.get(var)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// `var` as one of `choices` (case-insensitive), or `default` when unset.
pub fn choice<T: Copy>(
    env: &impl Env,
    var: &'static str,
    choices: &[(&str, T)],
    default: T,
) -> Result<T, ConfigError> {
    let Some(v) = env.get(var) else {
        return Ok(default);
    };
    choices
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(v.trim()))
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<_> = choices.iter().map(|(n, _)| *n).collect();
            ConfigError::invalid(var, v, format!("expected one of {}", names.join(", ")))
        })
}

/// `var` as an absolute `http://` or `https://` URL.
pub fn http_url(env: &impl Env, var: &'static str) -> Result<url::Url, ConfigError> {
    let raw = required(env, var)?;
    let parsed = url::Url::parse(raw.trim()).map_err(|e| ConfigError::invalid(var, &raw, e))?;
    match parsed.scheme() {
        "http" | "https" if parsed.host_str().is_some() => Ok(parsed),
        "http" | "https" => Err(ConfigError::invalid(var, raw, "the URL has no host")),
        other => Err(ConfigError::invalid(
            var,
            raw,
            format!("scheme {other:?} is not http or https"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_and_empty_values_take_the_default() {
        let env = [("PORT", "")];
        assert_eq!(parse_or(&env, "PORT", 8080u16), Ok(8080));
        assert_eq!(parse_or(&env, "OTHER", 1u16), Ok(1));
    }

    #[test]
    fn errors_name_the_variable_and_the_value() {
        let err = parse_or(&[("PORT", "eighty")], "PORT", 8080u16).unwrap_err();
        assert_eq!(
            err.to_string(),
            "PORT=\"eighty\" is invalid: invalid digit found in string"
        );
        let err = required(&[("X", "1")], "UPSTREAM_URL").unwrap_err();
        assert_eq!(err.to_string(), "UPSTREAM_URL is required but not set");
    }

    #[test]
    fn lists_are_trimmed_and_skip_empty_items() {
        let env = [("L", " a@x , ,b ")];
        assert_eq!(list(&env, "L"), ["a@x", "b"]);
        assert!(list(&env, "NONE").is_empty());
    }

    #[test]
    fn choices_are_case_insensitive_and_list_the_options() {
        let opts = [("on", true), ("off", false)];
        assert_eq!(choice(&[("M", "OFF")], "M", &opts, true), Ok(false));
        let err = choice(&[("M", "maybe")], "M", &opts, true).unwrap_err();
        assert!(err.to_string().contains("expected one of on, off"), "{err}");
    }

    #[test]
    fn urls_must_be_http_or_https_with_a_host() {
        assert!(http_url(&[("U", "http://ping:8080")], "U").is_ok());
        assert!(http_url(&[("U", "https://x.a.run.app")], "U").is_ok());
        for bad in ["ping:8080", "ftp://x", "not a url"] {
            let err = http_url(&[("U", bad)], "U").unwrap_err();
            assert!(err.to_string().starts_with("U="), "{bad}: {err}");
        }
        assert_eq!(
            http_url(&[("V", "x")], "U"),
            Err(ConfigError::Missing { var: "U" })
        );
    }

    #[test]
    fn durations_are_human() {
        let env = [("G", "250ms")];
        assert_eq!(
            duration_or(&env, "G", Duration::ZERO),
            Ok(Duration::from_millis(250))
        );
        assert!(duration_or(&[("G", "soon")], "G", Duration::ZERO).is_err());
    }

    #[test]
    fn the_recorder_lists_every_variable_asked_for() {
        let rec = Recorder::new([("A", "1")]);
        let _ = rec.get("A");
        let _ = parse_or(&rec, "B", 0u8);
        assert_eq!(rec.seen().into_iter().collect::<Vec<_>>(), ["A", "B"]);
    }
}
