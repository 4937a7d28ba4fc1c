//! Stripe adapter for RevPilot: Connect OAuth, complete and resumable sync, history rebuild and
//! billing webhooks (issue #4 and #5).
//!
//! So far: [`objects`], RevPilot's own tolerant types for the Stripe objects it reads, which
//! accept today's API shapes and the older ones.

pub mod objects;
