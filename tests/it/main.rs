//! Integration tests, built into one binary. They run the real relay (the
//! same `app::serve` as `dari-relay run`) against a fake Dari API and fake
//! receivers on 127.0.0.1:0, each test on its own temporary database.

mod adaptive;
mod admin;
mod admin_guard;
mod browser;
mod check_config;
mod cli;
mod config_bounds;
mod crash;
mod db_copy;
mod delivery;
mod delivery_stress;
mod diff_props;
mod docs;
mod engines;
mod fakes;
mod faults;
mod formats;
mod inbound;
mod layers;
mod lifecycle;
mod live;
mod operations;
mod ops;
mod pg;
mod pg_failover;
mod pg_relay;
mod proxy;
mod quickstart;
mod robustness;
mod store_conformance;
mod stress;
mod stress_poller;
mod teams;
mod tls;
mod webhooks;
