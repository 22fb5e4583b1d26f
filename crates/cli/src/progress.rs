//! The progress bar: drawn on a terminal only (indicatif hides it when stderr is not one).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `total` units named `what`.
pub fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template("{msg:>24} [{bar:40}] {pos}/{len} {elapsed_precise}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}
