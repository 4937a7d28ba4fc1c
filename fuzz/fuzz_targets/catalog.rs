//! The `catalog` fuzz target: a shim over `checks/catalog.rs`, which the regression replay runs too.
#![no_main]

#[path = "../checks/catalog.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    check::run(data);
});
