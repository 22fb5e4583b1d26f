//! The access matrix: the architectural walker checked, case by case, against a separate
//! rules function written from the SDM (see [`rules`]), over more than a million
//! combinations of entry flags, CPU state and accesses in 2-level, PAE and 4-level paging
//! (see [`cases`]), plus multi-access scenarios (see [`scenarios`]).

pub mod arena;
pub mod cases;
pub mod check;
pub mod flags;
pub mod rules;
pub mod scenarios;

use serde::Serialize;

pub use flags::MatrixMode;
pub use scenarios::ScenarioReport;

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatrixOptions {
    /// The modes to run.
    pub modes: Vec<MatrixMode>,
    /// Run every `stride`-th enumerated case only (1: all of them).
    pub stride: u64,
    /// Whether to run the multi-access scenarios too.
    pub scenarios: bool,
    /// How many mismatch descriptions to keep.
    pub max_reported: usize,
}

impl Default for MatrixOptions {
    fn default() -> Self {
        MatrixOptions {
            modes: MatrixMode::ALL.to_vec(),
            stride: 1,
            scenarios: true,
            max_reported: 10,
        }
    }
}

/// The counts of one mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModeReport {
    /// The mode.
    pub mode: MatrixMode,
    /// Its name ("2-level", "PAE", "4-level").
    pub name: &'static str,
    /// Enumerated cases run.
    pub matrix_cases: u64,
    /// Scenario accesses run.
    pub scenario_cases: u64,
    /// Both together.
    pub cases: u64,
    /// Cases where walker and rules disagree.
    pub mismatches: u64,
}

/// The result of a matrix run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MatrixReport {
    /// Every case run (enumerated and scenario).
    pub cases: u64,
    /// Every disagreement.
    pub mismatches: u64,
    /// Per mode.
    pub modes: Vec<ModeReport>,
    /// Per scenario family and mode.
    pub scenarios: Vec<ScenarioReport>,
    /// The first few disagreements, described.
    pub first_mismatches: Vec<String>,
}

/// Runs the matrix.
pub fn run(opts: &MatrixOptions) -> MatrixReport {
    let mut report = MatrixReport {
        cases: 0,
        mismatches: 0,
        modes: Vec::new(),
        scenarios: Vec::new(),
        first_mismatches: Vec::new(),
    };
    let stride = opts.stride.max(1);
    let mut mem = arena::ArenaMem::new();
    for &mode in &opts.modes {
        let mut mode_report = ModeReport {
            mode,
            name: mode.name(),
            matrix_cases: 0,
            scenario_cases: 0,
            cases: 0,
            mismatches: 0,
        };
        let mut index = 0u64;
        cases::for_each_case(mode, |case| {
            index += 1;
            if !(index - 1).is_multiple_of(stride) {
                return;
            }
            mode_report.matrix_cases += 1;
            if let Err(e) = check::check_case(&mut mem, case) {
                mode_report.mismatches += 1;
                if report.first_mismatches.len() < opts.max_reported {
                    let twice = if case.access.twice { " (twice)" } else { "" };
                    report
                        .first_mismatches
                        .push(format!("{}{twice}: {e}", case.setup()));
                }
            }
        });
        if opts.scenarios {
            for scenario in scenarios::all(mode) {
                mode_report.scenario_cases += scenario.cases;
                mode_report.mismatches += scenario.mismatches;
                for m in &scenario.first_mismatches {
                    if report.first_mismatches.len() < opts.max_reported {
                        report.first_mismatches.push(m.clone());
                    }
                }
                report.scenarios.push(scenario);
            }
        }
        mode_report.cases = mode_report.matrix_cases + mode_report.scenario_cases;
        report.cases += mode_report.cases;
        report.mismatches += mode_report.mismatches;
        report.modes.push(mode_report);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sampled_slice_of_every_mode_has_no_mismatch() {
        let report = run(&MatrixOptions {
            stride: 97,
            ..MatrixOptions::default()
        });
        assert_eq!(report.mismatches, 0, "{:#?}", report.first_mismatches);
        assert_eq!(report.modes.len(), 3);
        for mode in &report.modes {
            let full = cases::count_cases(mode.mode);
            assert_eq!(mode.matrix_cases, full.div_ceil(97), "{}", mode.name);
            assert!(mode.scenario_cases > 0);
        }
        let sum: u64 = report.modes.iter().map(|m| m.cases).sum();
        assert_eq!(report.cases, sum);
    }

    #[test]
    fn the_whole_two_level_matrix_has_no_mismatch() {
        let report = run(&MatrixOptions {
            modes: vec![MatrixMode::TwoLevel],
            scenarios: false,
            ..MatrixOptions::default()
        });
        assert_eq!(report.mismatches, 0, "{:#?}", report.first_mismatches);
        assert_eq!(report.cases, cases::count_cases(MatrixMode::TwoLevel));
    }
}
