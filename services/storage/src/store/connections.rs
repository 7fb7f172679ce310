//! Connections for the statements of the write path, kept by the store
//! between statements. sqlx's pool tests every connection released to it
//! with a round trip (`PoolConnection`'s drop spawns a task that pings
//! PostgreSQL): one more PostgreSQL wake-up and round trip per statement,
//! about a twelfth of a storage node's time on single writes. The store
//! takes its connections from the pool once and hands them out again
//! itself; only a lease whose statement did not finish cleanly (its future
//! was dropped, or the connection failed) goes back to the pool, whose
//! ping then flushes or drops it.

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool, Postgres};
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// The connections kept between statements, taken from `pool`.
pub(super) struct Connections {
    pool: PgPool,
    /// Idle connections ready for the next lease.
    kept: Mutex<Vec<PoolConnection<Postgres>>>,
    /// At most this many are kept idle, so the pool always has
    /// connections left for the statements that use it directly.
    keep_at_most: usize,
}

impl Connections {
    pub(super) fn new(pool: PgPool) -> Self {
        let keep_at_most = (pool.options().get_max_connections() as usize / 2).max(1);
        Connections {
            pool,
            kept: Mutex::new(Vec::new()),
            keep_at_most,
        }
    }

    /// A connection for one statement (or transaction): a kept one, or one
    /// from the pool (waiting up to its acquire timeout).
    pub(super) async fn lease(&self) -> Result<Lease<'_>, sqlx::Error> {
        let kept = self.kept.lock().expect("connections lock").pop();
        let conn = match kept {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        Ok(Lease {
            conn: Some(conn),
            home: self,
            ended: Ended::Cut,
        })
    }

    /// Gives every kept connection back to the pool (before it closes).
    pub(super) fn release_all(&self) {
        let kept = std::mem::take(&mut *self.kept.lock().expect("connections lock"));
        drop(kept);
    }

    /// How many connections are kept idle now.
    pub(super) fn idle(&self) -> usize {
        self.kept.lock().expect("connections lock").len()
    }
}

/// One connection lent out. Call [`Lease::done`] with the outcome of its
/// statement: it is then kept for the next lease, unless the outcome says
/// the connection itself failed. Dropped without `done` (its statement's
/// future was dropped mid-flight, leaving it in an unknown state), it goes
/// back to the pool, which tests it.
pub(super) struct Lease<'a> {
    conn: Option<PoolConnection<Postgres>>,
    home: &'a Connections,
    ended: Ended,
}

/// How a lease's statement ended.
enum Ended {
    /// Not at all (`done` was never called): the connection's state is unknown.
    Cut,
    /// With an answer from the server: the connection is ready for more.
    Answered,
    /// With the connection failing: the kept ones are likely broken too
    /// (PostgreSQL restarted), so all go back to the pool to be tested.
    Broken,
}

impl Lease<'_> {
    /// Ends the lease with its statement's outcome (which is passed on).
    pub(super) fn done<T, E: LeaseError>(mut self, outcome: Result<T, E>) -> Result<T, E> {
        self.ended = match &outcome {
            Err(err) if !err.leaves_connection_ready() => Ended::Broken,
            _ => Ended::Answered,
        };
        outcome
    }
}

/// An error a leased connection's statement can end with.
pub(super) trait LeaseError {
    /// A database's error answer (a constraint, a bad value) leaves the
    /// connection ready for the next statement; any other error may not.
    fn leaves_connection_ready(&self) -> bool;
}

impl LeaseError for sqlx::Error {
    fn leaves_connection_ready(&self) -> bool {
        match self {
            // Not a connection exception (class 08) nor the server ending
            // the session (57P01-57P03: shutdown, crash, cannot connect).
            sqlx::Error::Database(db) => !db
                .code()
                .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
            _ => false,
        }
    }
}

impl LeaseError for super::StoreError {
    fn leaves_connection_ready(&self) -> bool {
        matches!(
            self,
            super::StoreError::Rejected(_) | super::StoreError::IdempotencyConflict(_)
        )
    }
}

impl Deref for Lease<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn.as_ref().expect("a lease holds its connection")
    }
}

impl DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("a lease holds its connection")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        match self.ended {
            // A closing pool waits for every connection taken from it.
            Ended::Answered if !self.home.pool.is_closed() => {
                let mut kept = self.home.kept.lock().expect("connections lock");
                if kept.len() < self.home.keep_at_most {
                    kept.push(conn);
                    return;
                }
            }
            Ended::Broken => self.home.release_all(),
            _ => {}
        }
        // Back to the pool: it pings the connection, then keeps or closes it.
        drop(conn);
    }
}
