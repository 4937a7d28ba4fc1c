//! The `server_params` fuzz target: a shim over `checks/server_params.rs`, which the regression replay runs too.
#![no_main]

#[path = "../checks/server_params.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    check::run(data);
});
