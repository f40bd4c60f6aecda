//! What handing work from one process to another costs on this machine, apart from any service.
//!
//! Every call through a hop wakes the next process, and a wake that lands on an idle core waits
//! for that core to start again. In a VM that can be a large part of a call's own work: on the
//! 2-vCPU VMs of the README's and `docs/profiling.md`'s figures, one byte sent from thread to
//! thread and back took 11–69 µs across the two cores, depending on the machine, and 3–15 µs on
//! one (`perf bench sched pipe` on one of them: 41.9 and 7.1 µs, about 17 µs a wake), while a
//! relay call costs 20–40 µs of CPU. Every run measures it first, so a scenario's share of direct
//! can be read against the machine it came from.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    thread,
    time::{Duration, Instant},
};

use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};

/// Where `results.json` keeps the probe's figures, under `machine`.
pub(crate) const WAKE_ROUND_TRIP: &str = "wake_round_trip_us";
/// Both threads on the first core the process may use.
pub(crate) const ONE_CORE: &str = "one_core";
/// The threads on the first two cores the process may use.
pub(crate) const ACROSS_CORES: &str = "across_cores";

/// One byte's round trip between two threads in µs, on one core and across two: what waking
/// another process costs here before any service does. A pair whose probe fails is left out,
/// with a warning; one core only, there is no pair across.
pub(crate) fn wake_costs(rounds: u32) -> serde_json::Map<String, serde_json::Value> {
    let cores = cores();
    let mut pairs = Vec::new();
    if let Some(&a) = cores.first() {
        pairs.push((ONE_CORE, a, a));
        if let Some(&b) = cores.get(1) {
            pairs.push((ACROSS_CORES, a, b));
        }
    }
    let mut costs = serde_json::Map::new();
    for (name, a, b) in pairs {
        match round_trip(a, b, rounds) {
            Ok(mean) => {
                costs.insert(name.into(), (mean.as_secs_f64() * 1e6).into());
            }
            Err(e) => eprintln!("warning: wake probe {name}: {e}"),
        }
    }
    costs
}

/// The mean time one byte takes to go from a thread on core `a` to a thread on core `b` over a
/// socket and back, over `rounds` round trips after as many untimed ones.
fn round_trip(a: usize, b: usize, rounds: u32) -> Result<Duration, String> {
    let (mut near, mut far) = UnixStream::pair().map_err(|e| format!("socket pair: {e}"))?;
    let echo = thread::spawn(move || -> Result<u32, String> {
        pin(b)?;
        let mut byte = [0u8];
        let mut echoed = 0;
        loop {
            match far.read(&mut byte) {
                Ok(0) => return Ok(echoed),
                Ok(_) => {
                    far.write_all(&byte).map_err(|e| format!("echo: {e}"))?;
                    echoed += 1;
                }
                Err(e) => return Err(format!("echo: {e}")),
            }
        }
    });
    let timer = thread::spawn(move || -> Result<Duration, String> {
        pin(a)?;
        let mut byte = [0u8];
        let mut trip = || -> Result<(), String> {
            near.write_all(&byte).map_err(|e| format!("send: {e}"))?;
            near.read_exact(&mut byte)
                .map_err(|e| format!("reply: {e}"))
        };
        for _ in 0..rounds {
            trip()?;
        }
        let start = Instant::now();
        for _ in 0..rounds {
            trip()?;
        }
        Ok(start.elapsed() / rounds.max(1))
        // `near` closes here, which ends the echo.
    });
    let mean = timer.join().map_err(|_| "the timing thread panicked")?;
    // The echo's failure first: the timer's is only that the echo went away.
    let echoed = echo.join().map_err(|_| "the echo thread panicked")??;
    let mean = mean?;
    if echoed != 2 * rounds {
        return Err(format!("{echoed} of {} bytes came back", 2 * rounds));
    }
    Ok(mean)
}

/// The cores this process may run on.
fn cores() -> Vec<usize> {
    sched_getaffinity(Pid::from_raw(0)).map_or_else(
        |_| Vec::new(),
        |set| {
            (0..CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap_or(false))
                .collect()
        },
    )
}

/// Keeps the calling thread on `core`.
fn pin(core: usize) -> Result<(), String> {
    let mut set = CpuSet::new();
    set.set(core).map_err(|e| format!("core {core}: {e}"))?;
    sched_setaffinity(Pid::from_raw(0), &set).map_err(|e| format!("pinning to core {core}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_on_one_core_brings_every_byte_back() {
        let cores = cores();
        assert!(!cores.is_empty(), "the process may run somewhere");
        let mean = round_trip(cores[0], cores[0], 200).unwrap();
        assert!(mean > Duration::ZERO);
        assert!(mean < Duration::from_secs(1), "{mean:?} for one byte");
    }

    #[test]
    fn the_costs_name_each_pair_measured() {
        let costs = wake_costs(100);
        assert!(
            costs[ONE_CORE].as_f64().is_some_and(|us| us > 0.0),
            "{costs:?}"
        );
        // Across two cores only where the process may use two.
        assert_eq!(
            costs.contains_key(ACROSS_CORES),
            cores().len() > 1,
            "{costs:?}"
        );
    }

    #[test]
    fn a_core_the_process_may_not_use_is_refused() {
        let err = round_trip(0, CpuSet::count() + 1, 10).unwrap_err();
        assert!(err.contains("core"), "{err}");
    }
}
