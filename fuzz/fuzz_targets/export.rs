//! The `export` fuzz target: a shim over `checks/export.rs`, which the regression replay runs too.
#![no_main]

#[path = "../checks/export.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    check::run(data);
});
