//! The `fx` fuzz target: a shim over `checks/fx.rs`, which the regression replay runs too.
#![no_main]

#[path = "../checks/fx.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    check::run(data);
});
