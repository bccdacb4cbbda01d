//! [`OperatorStore`] on SQLite: each call is one of the store's synchronous
//! reads or writes, run on a blocking thread by [`Store::call`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::Sqlite;
use crate::store::operator::Tail;
use crate::store::ui::{Activity, DeliveryRow, DeliverySearch, JobNotification, LastError, WatchRow, WatchSearch};
use crate::store::*;
use crate::vocab::{DeliveryState, NewWatch};

impl OperatorStore for Sqlite {
    fn add_watches(&self, watches: Vec<NewWatch>) -> StoreFuture<'_, AddSummary> {
        Box::pin(self.0.call(move |s| s.add_watches(&watches)))
    }

    fn remove_watch(&self, job_id: String) -> StoreFuture<'_, bool> {
        Box::pin(self.0.call(move |s| s.remove_watch(&job_id)))
    }

    fn query_watches(&self, query: WatchQuery) -> StoreFuture<'_, Vec<WatchSummary>> {
        Box::pin(self.0.call(move |s| s.query_watches(&query)))
    }

    fn watch_counts(&self) -> StoreFuture<'_, BTreeMap<String, i64>> {
        Box::pin(self.0.call(|s| s.watch_counts()))
    }

    fn list_deliveries(&self, state: Option<DeliveryState>, limit: usize) -> StoreFuture<'_, Vec<DeliverySummary>> {
        Box::pin(self.0.call(move |s| s.list_deliveries(state, limit)))
    }

    fn query_deliveries(&self, filter: DeliveryFilter) -> StoreFuture<'_, Vec<DeliverySummary>> {
        Box::pin(self.0.call(move |s| s.query_deliveries(&filter)))
    }

    fn delivery(&self, id: i64) -> StoreFuture<'_, Option<DeliveryDetail>> {
        Box::pin(self.0.call(move |s| s.delivery(id)))
    }

    fn notifications_of(&self, job_id: String) -> StoreFuture<'_, Vec<StoredNotification>> {
        Box::pin(self.0.call(move |s| s.notifications_of(&job_id)))
    }

    fn attempts(&self, delivery_id: i64) -> StoreFuture<'_, Vec<AttemptRecord>> {
        Box::pin(self.0.call(move |s| s.attempts(delivery_id)))
    }

    fn retry_failed(&self, id: Option<i64>) -> StoreFuture<'_, usize> {
        Box::pin(self.0.call(move |s| s.retry_failed(id)))
    }

    fn retry_failed_of_webhook(&self, webhook: String) -> StoreFuture<'_, usize> {
        Box::pin(self.0.call(move |s| s.retry_failed_of_webhook(&webhook)))
    }

    fn delivery_counts(&self) -> StoreFuture<'_, BTreeMap<String, i64>> {
        Box::pin(self.0.call(|s| s.delivery_counts()))
    }

    fn backlog(&self) -> StoreFuture<'_, BTreeMap<String, Backlog>> {
        Box::pin(self.0.call(|s| s.backlog()))
    }

    fn webhook_backlog(&self) -> StoreFuture<'_, BTreeMap<String, Backlog>> {
        Box::pin(self.0.call(|s| s.webhook_backlog()))
    }

    fn webhook_pauses(&self) -> StoreFuture<'_, BTreeMap<String, (String, i64)>> {
        Box::pin(self.0.call(|s| s.paused_webhooks()))
    }

    fn resume_webhook(&self, webhook: String) -> StoreFuture<'_, bool> {
        Box::pin(self.0.call(move |s| s.resume_webhook(&webhook)))
    }

    fn webhook_concurrency(&self) -> StoreFuture<'_, BTreeMap<String, (u64, i64)>> {
        Box::pin(self.0.call(|s| s.webhook_concurrency()))
    }

    fn tail_start(&self) -> StoreFuture<'_, (i64, i64)> {
        Box::pin(self.0.call(|s| s.tail_start()))
    }

    fn tail_after(&self, notification: i64, attempt: i64, limit: usize) -> StoreFuture<'_, Tail> {
        Box::pin(self.0.call(move |s| s.tail_after(notification, attempt, limit)))
    }

    fn search_watches(&self, search: WatchSearch) -> StoreFuture<'_, Vec<WatchRow>> {
        Box::pin(self.0.call(move |s| s.search_watches(&search)))
    }

    fn search_deliveries(&self, search: DeliverySearch) -> StoreFuture<'_, Vec<DeliveryRow>> {
        Box::pin(self.0.call(move |s| s.search_deliveries(&search)))
    }

    fn last_errors(&self) -> StoreFuture<'_, BTreeMap<String, LastError>> {
        Box::pin(self.0.call(|s| s.last_errors()))
    }

    fn activity(&self, now_ms: i64, minutes: usize) -> StoreFuture<'_, Activity> {
        Box::pin(self.0.call(move |s| s.activity(now_ms, minutes)))
    }

    fn job_timeline(&self, job_id: String, after: i64, limit: usize) -> StoreFuture<'_, Vec<JobNotification>> {
        Box::pin(self.0.call(move |s| s.job_timeline(&job_id, after, limit)))
    }

    fn notification_count(&self, job_id: String) -> StoreFuture<'_, i64> {
        Box::pin(self.0.call(move |s| s.notification_count(&job_id)))
    }

    fn prune(&self, cutoff_ms: i64) -> StoreFuture<'_, PruneSummary> {
        Box::pin(self.0.call(move |s| s.prune(cutoff_ms)))
    }

    fn writable(&self, max_age: Duration) -> StoreFuture<'_, Result<(), String>> {
        Box::pin(self.0.call(move |s| Ok(s.writable(max_age))))
    }

    fn problems_at(&self, now: Instant, max_age: Duration) -> Vec<String> {
        self.0.problems_at(now, max_age)
    }
}
