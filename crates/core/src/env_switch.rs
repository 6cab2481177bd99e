//! On/off settings read once from the environment, for measuring one code path against another
//! in the same binary (`ALIGNMENT_SOFTMAX_KERNEL=0`, `ALIGNMENT_ADAMW_KERNEL=0`): a step reads
//! its switch many times, and the environment only once.

use std::sync::OnceLock;

/// A setting that is on unless its environment variable is `0` (surrounding spaces ignored),
/// read the first time it is asked and kept: `static KERNEL: EnvSwitch = EnvSwitch::new("…");`.
#[derive(Debug)]
pub struct EnvSwitch {
    name: &'static str,
    on: OnceLock<bool>,
}

impl EnvSwitch {
    /// The switch named by the environment variable `name`, not read yet.
    pub const fn new(name: &'static str) -> Self {
        Self { name, on: OnceLock::new() }
    }

    /// Whether the setting is on: the variable unset, or set to anything but `0`.
    pub fn is_on(&self) -> bool {
        *self.on.get_or_init(|| setting_is_on(std::env::var(self.name).ok().as_deref()))
    }

    /// The environment variable's name, for messages.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// Whether a variable's value (`None` when unset) leaves the setting on.
fn setting_is_on(value: Option<&str>) -> bool {
    value.is_none_or(|v| v.trim() != "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_zero_switches_off() {
        assert!(setting_is_on(None));
        assert!(setting_is_on(Some("1")));
        assert!(setting_is_on(Some("")));
        assert!(setting_is_on(Some("yes")));
        assert!(!setting_is_on(Some("0")));
        assert!(!setting_is_on(Some(" 0\n")));
    }

    #[test]
    fn the_variable_is_read_once() {
        static SWITCH: EnvSwitch = EnvSwitch::new("ALIGNMENT_ENV_SWITCH_TEST_ONLY");
        // This variable is used by this test alone.
        std::env::set_var(SWITCH.name(), "0");
        assert!(!SWITCH.is_on());
        std::env::set_var(SWITCH.name(), "1");
        assert!(!SWITCH.is_on(), "kept from the first read");
    }
}
