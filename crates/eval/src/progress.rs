//! A progress bar over a task's examples (hidden when stderr is not a terminal or when quiet).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress over the examples of one task.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar of `total` examples labelled `name`; `quiet` hides it.
    pub fn new(name: &str, total: u64, quiet: bool) -> Self {
        let bar = ProgressBar::new(total);
        if quiet {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        let style = ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} examples, {elapsed} elapsed, eta {eta}")
            .expect("a valid template")
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(name.to_string());
        Self { bar }
    }

    /// A bar that is never drawn.
    pub fn hidden() -> Self {
        Self::new("", 0, true)
    }

    /// Advances by `n` examples.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Sets the total (when a task learns how many steps it takes).
    pub fn set_length(&self, total: u64) {
        self.bar.set_length(total);
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
