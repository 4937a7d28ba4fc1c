//! The `stripe_objects` fuzz target: a shim over `checks/stripe_objects.rs`, which the regression replay runs too.
#![no_main]

#[path = "../checks/stripe_objects.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    check::run(data);
});
