//! dari-relay turns polling of Dari's job status endpoint into push.
//!
//! Every stage speaks the shared vocabulary of [`vocab`] (ids, states, kinds,
//! the clock), which imports no stage.
//!
//! Data flows through one module per stage, in this order: [`config`] is read
//! and resolved once; [`store`] keeps watches, each job's last-seen state and
//! the outbox of notifications and deliveries in SQLite (all SQL lives there);
//! [`upstream`] asks Dari for a job's status; [`diff`] compares that answer with
//! the last-seen state (pure, no I/O); [`notification`] turns the resulting
//! transitions into the bodies receivers get; [`poller`] schedules the polls and
//! commits each diff with its deliveries in one transaction; [`deliver`] sends
//! the outbox to webhooks in order per job and webhook; [`app`] wires the loops
//! together; [`inbound`] turns Dari's own webhook into "poll now"; [`watches`] is adding
//! watches (the watch request, start-and-watch), shared by [`admin`] and [`cli`]; [`cli`] implements the commands and [`demo`] runs the whole
//! pipeline against a simulated portal.

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod deliver;
pub mod demo;
pub mod diff;
pub mod format;
pub mod glob;
pub mod health;
pub mod inbound;
pub mod metrics;
pub mod notification;
pub mod poller;
pub mod retry;
pub mod signature;
pub mod store;
pub mod ui;
pub mod upstream;
pub mod vocab;
pub mod watches;

/// The `user-agent` of every request the relay makes, upstream and to receivers.
pub const USER_AGENT: &str = concat!("dari-relay/", env!("CARGO_PKG_VERSION"));
