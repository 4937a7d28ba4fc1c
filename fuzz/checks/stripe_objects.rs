//! Every Stripe-object parser (`revpilot_stripe::objects::parse` for each type the sync reads)
//! and the billing webhook's event parser, on arbitrary bytes. Errors are fine, panics are not.

use revpilot_stripe::billing::parse_event;
use revpilot_stripe::objects::{
    Charge, Coupon, Customer, Event, Invoice, Price, Subscription, parse,
};

/// One input, as the `stripe_objects` target and the regression replay run it.
pub(crate) fn run(data: &[u8]) {
    let _ = parse::<Customer>("customer", data);
    let _ = parse::<Subscription>("subscription", data);
    let _ = parse::<Invoice>("invoice", data);
    let _ = parse::<Charge>("charge", data);
    let _ = parse::<Price>("price", data);
    let _ = parse::<Coupon>("coupon", data);
    let _ = parse::<Event>("event", data);
    let _ = parse_event(data);
}
