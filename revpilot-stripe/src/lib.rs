//! Stripe adapter for RevPilot: Connect OAuth, complete and resumable sync, history rebuild and
//! billing webhooks. It implements `revpilot-core`'s Stripe port; it is filled by the Stripe issue.
