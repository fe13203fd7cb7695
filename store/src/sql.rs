//! The SQL both drivers share, written once.
//!
//! `sql_store!` expands, inside `sqlite.rs` and `postgres.rs`, to the row
//! mappers, the mutation appliers and the [`Store`](crate::Store) impl for that
//! driver's store type. The statements are identical on both drivers: `$N`
//! placeholders (sqlx maps `$N` to the N-th argument on SQLite too),
//! `ON CONFLICT … DO UPDATE`, `RETURNING`, and `CAST(… AS TEXT)` where a type
//! must be explicit. What differs is passed in: how a write transaction begins
//! (`BEGIN IMMEDIATE` on SQLite so the write lock is taken up front), and the
//! row-lock suffix (`FOR UPDATE` on Postgres; SQLite's writer lock already
//! serialises). Writing the bodies once keeps the two drivers from drifting;
//! the contract suite proves they behave the same.
//!
//! Every mutation runs inside a savepoint: a deterministic failure
//! (`NotFound`, `Conflict`, `Invalid`) rolls back only that mutation, so a batch
//! leaves nothing of it behind, while a database failure aborts the whole
//! transaction.

macro_rules! sql_store {
    (store = $store:ident, db = $db:ty, conn = $conn:ty, begin = $begin:expr, begin_read = $begin_read:expr, for_update = $lock:expr $(,)?) => {
        use std::future::Future;
        use std::pin::Pin;

        use async_trait::async_trait;
        use sqlx::Row as _;

        use $crate::lease::{self, AcquireLease, RenewLease};
        use $crate::model::*;
        use $crate::mutation::{BatchOutcome, Mutation, MutationOutput};
        use $crate::types::{from_json, to_json};
        use $crate::{Store, StoreError};

        type DbRow = <$db as sqlx::Database>::Row;

        const SANDBOX_COLS: &str = "id, state, runtime, image, memory_mb, vcpus, owner_id, tenant_id, \
             worker_id, runtime_id, metadata, created_at, updated_at, expires_at";
        const WORKER_COLS: &str = "id, hostname, status, rpc_url, runtimes, capabilities, capacity, \
             last_heartbeat, created_at, updated_at";
        const LEASE_COLS: &str =
            "resource_id, resource_type, holder_id, generation, granted_at, expires_at, updated_at";
        const TENANT_COLS: &str = "id, name, owner_id, settings, created_at, updated_at";
        const MEMBER_COLS: &str = "tenant_id, user_id, role, created_at, updated_at";
        const POLICY_COLS: &str =
            "id, tenant_id, resource_type, effect, pattern, priority, created_at, updated_at";
        const QUOTA_COLS: &str = "owner_id, max_sandboxes, max_ttl_seconds, \
             max_exec_timeout_seconds, created_at, updated_at";
        const TEMPLATE_COLS: &str = "name, version, image, description, runtime, setup, \
             allowed_hosts, env, memory_mb, vcpus, ttl_seconds, created_at, updated_at";
        const EXEC_LOG_COLS: &str =
            "id, sandbox_id, command, exit_code, stdout, stderr, duration_ms, created_at";
        const ADMIN_AUDIT_COLS: &str = "id, actor, method, path, status, duration_ms, request_id, \
             remote_addr, user_agent, tenant_id, created_at";
        const OP_AUDIT_COLS: &str = "id, actor, action, sandbox_id, resource, runtime, status, \
             detail, tenant_id, created_at";
        const REVOKED_COLS: &str = "jti, reason, revoked_at, expires_at";
        const ENROLLMENT_COLS: &str = "token_hash, worker_id, created_at, expires_at, used_at";
        const CREDENTIAL_COLS: &str = "worker_id, token_hash, created_at, updated_at";

        fn parse_enum<T: std::str::FromStr>(text: String, column: &str) -> Result<T, sqlx::Error> {
            text.parse().map_err(|_| sqlx::Error::ColumnDecode {
                index: column.to_owned(),
                source: format!("unexpected value {text:?}").into(),
            })
        }

        fn sandbox_row(r: &DbRow) -> Result<Sandbox, sqlx::Error> {
            Ok(Sandbox {
                id: r.try_get("id")?,
                state: parse_enum(r.try_get("state")?, "state")?,
                runtime: r.try_get("runtime")?,
                image: r.try_get("image")?,
                memory_mb: r.try_get("memory_mb")?,
                vcpus: r.try_get("vcpus")?,
                owner_id: r.try_get("owner_id")?,
                tenant_id: r.try_get("tenant_id")?,
                worker_id: r.try_get("worker_id")?,
                runtime_id: r.try_get("runtime_id")?,
                metadata: from_json(&r.try_get::<String, _>("metadata")?, "metadata")?,
                created_at: r.try_get("created_at")?,
                updated_at: r.try_get("updated_at")?,
                expires_at: r.try_get("expires_at")?,
            })
        }

        fn worker_row(r: &DbRow) -> Result<Worker, sqlx::Error> {
            Ok(Worker {
                id: r.try_get("id")?,
                hostname: r.try_get("hostname")?,
                status: parse_enum(r.try_get("status")?, "status")?,
                rpc_url: r.try_get("rpc_url")?,
                runtimes: from_json(&r.try_get::<String, _>("runtimes")?, "runtimes")?,
                capabilities: from_json(&r.try_get::<String, _>("capabilities")?, "capabilities")?,
                capacity: from_json(&r.try_get::<String, _>("capacity")?, "capacity")?,
                last_heartbeat: r.try_get("last_heartbeat")?,
                created_at: r.try_get("created_at")?,
                updated_at: r.try_get("updated_at")?,
            })
        }

        fn lease_row(r: &DbRow) -> Result<Lease, sqlx::Error> {
            Ok(Lease {
                resource_id: r.try_get("resource_id")?,
                resource_type: r.try_get("resource_type")?,
                holder_id: r.try_get("holder_id")?,
                generation: r.try_get("generation")?,
                granted_at: r.try_get("granted_at")?,
                expires_at: r.try_get("expires_at")?,
                updated_at: r.try_get("updated_at")?,
            })
        }

        fn tenant_row(r: &DbRow) -> Result<Tenant, sqlx::Error> {
            Ok(Tenant {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                owner_id: r.try_get("owner_id")?,
                settings: r.try_get("settings")?,
                created_at: r.try_get("created_at")?,
                updated_at: r.try_get("updated_at")?,
            })
        }

        fn member_row(r: &DbRow) -> Result<TenantMember, sqlx::Error> {
            Ok(TenantMember {
                tenant_id: r.try_get("tenant_id")?,
                user_id: r.try_get("user_id")?,
                role: parse_enum(r.try_get("role")?, "role")?,
                created_at: r.try_get("created_at")?,
                updated_at: r.try_get("updated_at")?,
            })
        }

        fn policy_row(r: &DbRow) -> Result<Policy, sqlx::Error> {
            Ok(Policy {
                id: r.try_get("id")?,
                tenant_id: r.try_get("tenant_id")?,
                resource_type: parse_enum(r.try_get("resource_type")?, "resource_type")?,
                effect: parse_enum(r.try_get("effect")?, "effect")?,
                pattern: r.try_get("pattern")?,
                priority: r.try_get("priority")?,
                created_at: r.try_get("created_at")?,
                updated_at: r.try_get("updated_at")?,
            })
        }

        fn quota_row(r: &DbRow) -> Result<OwnerQuota, sqlx::Error> {
            Ok(OwnerQuota {
                owner_id: r.try_get("owner_id")?,
                max_sandboxes: r.try_get("max_sandboxes")?,
                max_ttl_seconds: r.try_get("max_ttl_seconds")?,
                max_exec_timeout_seconds: r.try_get("max_exec_timeout_seconds")?,
                created_at: r.try_get("created_at")?,
                updated_at: r.try_get("updated_at")?,
            })
        }

        fn template_row(r: &DbRow) -> Result<Template, sqlx::Error> {
            Ok(Template {
                name: r.try_get("name")?,
                version: r.try_get("version")?,
                image: r.try_get("image")?,
                description: r.try_get("description")?,
                runtime: r.try_get("runtime")?,
                setup: from_json(&r.try_get::<String, _>("setup")?, "setup")?,
                allowed_hosts: from_json(&r.try_get::<String, _>("allowed_hosts")?, "allowed_hosts")?,
                env: from_json(&r.try_get::<String, _>("env")?, "env")?,
                memory_mb: r.try_get("memory_mb")?,
                vcpus: r.try_get("vcpus")?,
                ttl_seconds: r.try_get("ttl_seconds")?,
                created_at: r.try_get("created_at")?,
                updated_at: r.try_get("updated_at")?,
            })
        }

        fn exec_log_row(r: &DbRow) -> Result<ExecLog, sqlx::Error> {
            Ok(ExecLog {
                id: r.try_get("id")?,
                sandbox_id: r.try_get("sandbox_id")?,
                command: r.try_get("command")?,
                exit_code: r.try_get("exit_code")?,
                stdout: r.try_get("stdout")?,
                stderr: r.try_get("stderr")?,
                duration_ms: r.try_get("duration_ms")?,
                created_at: r.try_get("created_at")?,
            })
        }

        fn admin_audit_row(r: &DbRow) -> Result<AdminAudit, sqlx::Error> {
            Ok(AdminAudit {
                id: r.try_get("id")?,
                actor: r.try_get("actor")?,
                method: r.try_get("method")?,
                path: r.try_get("path")?,
                status: r.try_get("status")?,
                duration_ms: r.try_get("duration_ms")?,
                request_id: r.try_get("request_id")?,
                remote_addr: r.try_get("remote_addr")?,
                user_agent: r.try_get("user_agent")?,
                tenant_id: r.try_get("tenant_id")?,
                created_at: r.try_get("created_at")?,
            })
        }

        fn op_audit_row(r: &DbRow) -> Result<OperationAudit, sqlx::Error> {
            Ok(OperationAudit {
                id: r.try_get("id")?,
                actor: r.try_get("actor")?,
                action: r.try_get("action")?,
                sandbox_id: r.try_get("sandbox_id")?,
                resource: r.try_get("resource")?,
                runtime: r.try_get("runtime")?,
                status: parse_enum(r.try_get("status")?, "status")?,
                detail: r.try_get("detail")?,
                tenant_id: r.try_get("tenant_id")?,
                created_at: r.try_get("created_at")?,
            })
        }

        fn revoked_row(r: &DbRow) -> Result<RevokedToken, sqlx::Error> {
            Ok(RevokedToken {
                jti: r.try_get("jti")?,
                reason: r.try_get("reason")?,
                revoked_at: r.try_get("revoked_at")?,
                expires_at: r.try_get("expires_at")?,
            })
        }

        fn enrollment_row(r: &DbRow) -> Result<Enrollment, sqlx::Error> {
            Ok(Enrollment {
                token_hash: r.try_get("token_hash")?,
                worker_id: r.try_get("worker_id")?,
                created_at: r.try_get("created_at")?,
                expires_at: r.try_get("expires_at")?,
                used_at: r.try_get("used_at")?,
            })
        }

        fn credential_row(r: &DbRow) -> Result<WorkerCredential, sqlx::Error> {
            Ok(WorkerCredential {
                worker_id: r.try_get("worker_id")?,
                token_hash: r.try_get("token_hash")?,
                created_at: r.try_get("created_at")?,
                updated_at: r.try_get("updated_at")?,
            })
        }

        /// Maps rows, classifying any decode failure for `entity` `id`.
        fn map_rows<T>(
            rows: Vec<DbRow>,
            f: fn(&DbRow) -> Result<T, sqlx::Error>,
            entity: &str,
        ) -> Result<Vec<T>, StoreError> {
            rows.iter().map(|r| f(r).map_err(|e| StoreError::from_sqlx(e, entity, ""))).collect()
        }

        fn index_i64(index: u64) -> Result<i64, StoreError> {
            i64::try_from(index)
                .map_err(|_| StoreError::Invalid(format!("log index {index} is out of range")))
        }

        async fn fetch_lease(conn: &mut $conn, resource_id: &str) -> Result<Option<Lease>, StoreError> {
            let sql = format!("SELECT {LEASE_COLS} FROM leases WHERE resource_id = $1{}", $lock);
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(resource_id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "lease", resource_id))?;
            row.as_ref()
                .map(lease_row)
                .transpose()
                .map_err(|e| StoreError::from_sqlx(e, "lease", resource_id))
        }

        async fn write_lease(conn: &mut $conn, l: &Lease) -> Result<(), StoreError> {
            let sql = format!(
                "INSERT INTO leases ({LEASE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (resource_id) DO UPDATE SET resource_type = excluded.resource_type, \
                 holder_id = excluded.holder_id, generation = excluded.generation, \
                 granted_at = excluded.granted_at, expires_at = excluded.expires_at, \
                 updated_at = excluded.updated_at"
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&l.resource_id)
                .bind(&l.resource_type)
                .bind(&l.holder_id)
                .bind(l.generation)
                .bind(l.granted_at)
                .bind(l.expires_at)
                .bind(l.updated_at)
                .execute(&mut *conn)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "lease", &l.resource_id))?;
            Ok(())
        }

        /// Locks a resource's lease state and returns the highest generation
        /// ever granted for it. Every lease operation calls this first, so all
        /// of them take locks in the same order (no deadlocks on Postgres) and
        /// racing acquirers of one resource queue here: on Postgres on the
        /// `FOR UPDATE` row lock, on SQLite on the writer lock that
        /// `BEGIN IMMEDIATE` already holds.
        async fn lock_resource(conn: &mut $conn, rid: &str) -> Result<i64, StoreError> {
            sqlx::query(
                "INSERT INTO lease_generations (resource_id, last_generation) VALUES ($1, 0) \
                 ON CONFLICT (resource_id) DO NOTHING",
            )
            .bind(rid)
            .execute(&mut *conn)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "lease", rid))?;
            let sql = format!(
                "SELECT last_generation FROM lease_generations WHERE resource_id = $1{}",
                $lock
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(rid)
                .fetch_one(&mut *conn)
                .await
                .and_then(|r| r.try_get(0))
                .map_err(|e| StoreError::from_sqlx(e, "lease", rid))
        }

        async fn acquire_lease(conn: &mut $conn, req: &AcquireLease) -> Result<MutationOutput, StoreError> {
            req.validate()?;
            let rid = req.resource_id.as_str();
            let last = lock_resource(conn, rid).await?;
            let current = fetch_lease(conn, rid).await?;
            let granted = lease::decide_acquire(current.as_ref(), last, req)?;
            write_lease(conn, &granted).await?;
            sqlx::query("UPDATE lease_generations SET last_generation = $2 WHERE resource_id = $1")
                .bind(rid)
                .bind(granted.generation)
                .execute(&mut *conn)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "lease", rid))?;
            Ok(MutationOutput::Lease(granted))
        }

        async fn renew_lease(conn: &mut $conn, req: &RenewLease) -> Result<MutationOutput, StoreError> {
            $crate::model::check_id("lease resource id", &req.resource_id)?;
            lock_resource(conn, &req.resource_id).await?;
            let current = fetch_lease(conn, &req.resource_id).await?;
            let renewed = lease::decide_renew(current.as_ref(), req)?;
            write_lease(conn, &renewed).await?;
            Ok(MutationOutput::Lease(renewed))
        }

        async fn delete_lease(conn: &mut $conn, rid: &str) -> Result<MutationOutput, StoreError> {
            lock_resource(conn, rid).await?;
            let done = sqlx::query("DELETE FROM leases WHERE resource_id = $1")
                .bind(rid)
                .execute(&mut *conn)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "lease", rid))?;
            if done.rows_affected() == 0 {
                return Err(StoreError::not_found("lease", rid));
            }
            Ok(MutationOutput::Done)
        }

        /// Inserts a worker credential, or replaces the hash and `updated_at` of
        /// the worker's existing one (its `created_at` is kept).
        async fn write_credential(conn: &mut $conn, c: &WorkerCredential) -> Result<(), StoreError> {
            let sql = format!(
                "INSERT INTO worker_credentials ({CREDENTIAL_COLS}) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (worker_id) DO UPDATE SET token_hash = excluded.token_hash, \
                 updated_at = excluded.updated_at"
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&c.worker_id)
                .bind(&c.token_hash)
                .bind(c.created_at)
                .bind(c.updated_at)
                .execute(&mut *conn)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "worker credential", &c.worker_id))?;
            Ok(())
        }

        /// Exchanges an enrollment for a credential. The enrollment row is read
        /// under the write lock (Postgres: `FOR UPDATE`, so a racing consumer
        /// waits and then sees `used_at` set; SQLite: `BEGIN IMMEDIATE` already
        /// holds the writer lock), and the claim re-checks `used_at IS NULL`.
        async fn consume_enrollment(
            conn: &mut $conn,
            token_hash: &str,
            worker_id: &str,
            credential_hash: &str,
            now: Ts,
        ) -> Result<MutationOutput, StoreError> {
            const ENTITY: &str = "enrollment";
            let label = hash_label(token_hash);
            let sql = format!(
                "SELECT {ENROLLMENT_COLS} FROM worker_enrollments WHERE token_hash = $1{}",
                $lock
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(token_hash)
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| StoreError::from_sqlx(e, ENTITY, &label))?
                .ok_or_else(|| StoreError::not_found(ENTITY, label.as_str()))?;
            let enrollment = enrollment_row(&row).map_err(|e| StoreError::from_sqlx(e, ENTITY, &label))?;
            if enrollment.used_at.is_some() {
                return Err(StoreError::conflict(ENTITY, label, "already used"));
            }
            if enrollment.expires_at <= now {
                return Err(StoreError::conflict(ENTITY, label, "expired"));
            }
            if enrollment.worker_id != worker_id {
                return Err(StoreError::conflict(ENTITY, label, "issued for another worker"));
            }
            let claimed = sqlx::query(
                "UPDATE worker_enrollments SET used_at = $2 WHERE token_hash = $1 AND used_at IS NULL",
            )
            .bind(token_hash)
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(|e| StoreError::from_sqlx(e, ENTITY, &label))?;
            if claimed.rows_affected() != 1 {
                return Err(StoreError::conflict(ENTITY, label, "already used"));
            }
            write_credential(
                conn,
                &WorkerCredential {
                    worker_id: worker_id.to_owned(),
                    token_hash: credential_hash.to_owned(),
                    created_at: now,
                    updated_at: now,
                },
            )
            .await?;
            Ok(MutationOutput::Done)
        }

        /// Runs one statement that must touch a row; zero rows is `NotFound`.
        async fn exec_one(
            conn: &mut $conn,
            q: sqlx::query::Query<'_, $db, <$db as sqlx::Database>::Arguments>,
            entity: &str,
            id: &str,
        ) -> Result<MutationOutput, StoreError> {
            let done = q.execute(&mut *conn).await.map_err(|e| StoreError::from_sqlx(e, entity, id))?;
            if done.rows_affected() == 0 {
                return Err(StoreError::not_found(entity, id));
            }
            Ok(MutationOutput::Done)
        }

        async fn exec_count(
            conn: &mut $conn,
            q: sqlx::query::Query<'_, $db, <$db as sqlx::Database>::Arguments>,
            entity: &str,
        ) -> Result<MutationOutput, StoreError> {
            let done = q.execute(&mut *conn).await.map_err(|e| StoreError::from_sqlx(e, entity, ""))?;
            Ok(MutationOutput::Count(done.rows_affected()))
        }

        async fn insert_returning_id(
            conn: &mut $conn,
            q: sqlx::query::Query<'_, $db, <$db as sqlx::Database>::Arguments>,
            entity: &str,
            id: &str,
        ) -> Result<MutationOutput, StoreError> {
            let id = q
                .fetch_one(&mut *conn)
                .await
                .and_then(|r| r.try_get::<i64, _>(0))
                .map_err(|e| StoreError::from_sqlx(e, entity, id))?;
            Ok(MutationOutput::Id(id))
        }

        /// Updates a live (not destroyed) sandbox; tells `NotFound` from
        /// "destroyed" (`Conflict`) when nothing matched.
        async fn update_live_sandbox(
            conn: &mut $conn,
            q: sqlx::query::Query<'_, $db, <$db as sqlx::Database>::Arguments>,
            id: &str,
        ) -> Result<MutationOutput, StoreError> {
            let done = q.execute(&mut *conn).await.map_err(|e| StoreError::from_sqlx(e, "sandbox", id))?;
            if done.rows_affected() > 0 {
                return Ok(MutationOutput::Done);
            }
            let exists = sqlx::query("SELECT 1 FROM sandboxes WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "sandbox", id))?;
            match exists {
                Some(_) => Err(StoreError::conflict("sandbox", id, "is destroyed")),
                None => Err(StoreError::not_found("sandbox", id)),
            }
        }

        /// Applies one mutation inside its own savepoint: a deterministic
        /// failure rolls back only this mutation.
        fn apply_guarded<'a>(
            conn: &'a mut $conn,
            m: &'a Mutation,
            depth: usize,
        ) -> Pin<Box<dyn Future<Output = Result<MutationOutput, StoreError>> + Send + 'a>> {
            Box::pin(async move {
                m.validate()?;
                let sp = format!("stacyvm_m{depth}");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SAVEPOINT {sp}")))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "savepoint", &sp))?;
                let out = apply_one(conn, m, depth).await;
                let end = match &out {
                    Ok(_) => format!("RELEASE SAVEPOINT {sp}"),
                    Err(e) if e.is_deterministic() => {
                        format!("ROLLBACK TO SAVEPOINT {sp}; RELEASE SAVEPOINT {sp}")
                    }
                    // The caller aborts the whole transaction.
                    Err(_) => return out,
                };
                sqlx::raw_sql(sqlx::AssertSqlSafe(end))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "savepoint", &sp))?;
                out
            })
        }

        async fn apply_one(conn: &mut $conn, m: &Mutation, depth: usize) -> Result<MutationOutput, StoreError> {
            match m {
                Mutation::CreateSandbox(s) => {
                    let sql = format!(
                        "INSERT INTO sandboxes ({SANDBOX_COLS}) VALUES \
                         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
                    );
                    let q = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(&s.id)
                        .bind(s.state.as_str())
                        .bind(&s.runtime)
                        .bind(&s.image)
                        .bind(s.memory_mb)
                        .bind(s.vcpus)
                        .bind(&s.owner_id)
                        .bind(&s.tenant_id)
                        .bind(&s.worker_id)
                        .bind(&s.runtime_id)
                        .bind(to_json(&s.metadata))
                        .bind(s.created_at)
                        .bind(s.updated_at)
                        .bind(s.expires_at);
                    exec_one(conn, q, "sandbox", &s.id).await
                }
                Mutation::SetSandboxState { id, state, at } => {
                    let q = sqlx::query(
                        "UPDATE sandboxes SET state = $2, updated_at = $3 \
                         WHERE id = $1 AND state <> 'destroyed'",
                    )
                    .bind(id)
                    .bind(state.as_str())
                    .bind(*at);
                    update_live_sandbox(conn, q, id).await
                }
                Mutation::SetSandboxPlacement { id, worker_id, runtime_id, at } => {
                    let q = sqlx::query(
                        "UPDATE sandboxes SET worker_id = $2, runtime_id = $3, updated_at = $4 \
                         WHERE id = $1 AND state <> 'destroyed'",
                    )
                    .bind(id)
                    .bind(worker_id)
                    .bind(runtime_id)
                    .bind(*at);
                    update_live_sandbox(conn, q, id).await
                }
                Mutation::SetSandboxExpiry { id, expires_at, at } => {
                    let q = sqlx::query(
                        "UPDATE sandboxes SET expires_at = $2, updated_at = $3 \
                         WHERE id = $1 AND state <> 'destroyed'",
                    )
                    .bind(id)
                    .bind(*expires_at)
                    .bind(*at);
                    update_live_sandbox(conn, q, id).await
                }
                Mutation::DestroySandbox { id, at } => {
                    let q = sqlx::query(
                        "UPDATE sandboxes SET state = 'destroyed', updated_at = $2 \
                         WHERE id = $1 AND state <> 'destroyed'",
                    )
                    .bind(id)
                    .bind(*at);
                    match update_live_sandbox(conn, q, id).await {
                        // Destroying a destroyed sandbox is a no-op, not an error.
                        Err(StoreError::Conflict { .. }) => Ok(MutationOutput::Done),
                        other => other,
                    }
                }
                Mutation::AppendExecLog(l) => {
                    let q = sqlx::query(
                        "INSERT INTO exec_logs (id, sandbox_id, command, exit_code, stdout, stderr, \
                         duration_ms, created_at) VALUES (COALESCE(NULLIF($8, 0), (SELECT COALESCE(MAX(id), 0) + 1 FROM exec_logs)), \
                         $1, $2, $3, $4, $5, $6, $7) RETURNING id",
                    )
                    .bind(&l.sandbox_id)
                    .bind(&l.command)
                    .bind(l.exit_code)
                    .bind(&l.stdout)
                    .bind(&l.stderr)
                    .bind(l.duration_ms)
                    .bind(l.created_at)
                    .bind(l.id);
                    insert_returning_id(conn, q, "exec log for sandbox", &l.sandbox_id).await
                }
                Mutation::DeleteExecLogsBefore { before } => {
                    let q = sqlx::query("DELETE FROM exec_logs WHERE created_at < $1").bind(*before);
                    exec_count(conn, q, "exec log").await
                }
                Mutation::PutWorker(w) => {
                    let sql = format!(
                        "INSERT INTO workers ({WORKER_COLS}) VALUES \
                         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                         ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname, \
                         status = excluded.status, rpc_url = excluded.rpc_url, \
                         runtimes = excluded.runtimes, capabilities = excluded.capabilities, \
                         capacity = excluded.capacity, last_heartbeat = excluded.last_heartbeat, \
                         updated_at = excluded.updated_at"
                    );
                    let q = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(&w.id)
                        .bind(&w.hostname)
                        .bind(w.status.as_str())
                        .bind(&w.rpc_url)
                        .bind(to_json(&w.runtimes))
                        .bind(to_json(&w.capabilities))
                        .bind(to_json(&w.capacity))
                        .bind(w.last_heartbeat)
                        .bind(w.created_at)
                        .bind(w.updated_at);
                    exec_one(conn, q, "worker", &w.id).await
                }
                Mutation::SetWorkerStatus { id, status, at } => {
                    let q = sqlx::query("UPDATE workers SET status = $2, updated_at = $3 WHERE id = $1")
                        .bind(id)
                        .bind(status.as_str())
                        .bind(*at);
                    exec_one(conn, q, "worker", id).await
                }
                Mutation::DeleteWorker { id } => {
                    let q = sqlx::query("DELETE FROM workers WHERE id = $1").bind(id);
                    exec_one(conn, q, "worker", id).await
                }
                Mutation::AcquireLease(req) => acquire_lease(conn, req).await,
                Mutation::RenewLease(req) => renew_lease(conn, req).await,
                Mutation::ReleaseLease { resource_id, holder_id } => {
                    lock_resource(conn, resource_id).await?;
                    let current = fetch_lease(conn, resource_id).await?;
                    lease::decide_release(current.as_ref(), resource_id, holder_id)?;
                    delete_lease(conn, resource_id).await
                }
                Mutation::RevokeLease { resource_id } => delete_lease(conn, resource_id).await,
                Mutation::CreateTenant(t) => {
                    let sql = format!("INSERT INTO tenants ({TENANT_COLS}) VALUES ($1, $2, $3, $4, $5, $6)");
                    let q = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(&t.id)
                        .bind(&t.name)
                        .bind(&t.owner_id)
                        .bind(&t.settings)
                        .bind(t.created_at)
                        .bind(t.updated_at);
                    exec_one(conn, q, "tenant", &t.id).await
                }
                Mutation::UpdateTenant(t) => {
                    let q = sqlx::query(
                        "UPDATE tenants SET name = $2, owner_id = $3, settings = $4, updated_at = $5 \
                         WHERE id = $1",
                    )
                    .bind(&t.id)
                    .bind(&t.name)
                    .bind(&t.owner_id)
                    .bind(&t.settings)
                    .bind(t.updated_at);
                    exec_one(conn, q, "tenant", &t.id).await
                }
                Mutation::DeleteTenant { id } => {
                    // Members and policies go with it (ON DELETE CASCADE).
                    let q = sqlx::query("DELETE FROM tenants WHERE id = $1").bind(id);
                    exec_one(conn, q, "tenant", id).await
                }
                Mutation::PutMember(mb) => {
                    let sql = format!(
                        "INSERT INTO tenant_members ({MEMBER_COLS}) VALUES ($1, $2, $3, $4, $5) \
                         ON CONFLICT (tenant_id, user_id) DO UPDATE SET role = excluded.role, \
                         updated_at = excluded.updated_at"
                    );
                    let q = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(&mb.tenant_id)
                        .bind(&mb.user_id)
                        .bind(mb.role.as_str())
                        .bind(mb.created_at)
                        .bind(mb.updated_at);
                    exec_one(conn, q, "tenant member", &mb.user_id).await
                }
                Mutation::DeleteMember { tenant_id, user_id } => {
                    let q = sqlx::query("DELETE FROM tenant_members WHERE tenant_id = $1 AND user_id = $2")
                        .bind(tenant_id)
                        .bind(user_id);
                    exec_one(conn, q, "tenant member", user_id).await
                }
                Mutation::CreatePolicy(p) => {
                    let sql = format!(
                        "INSERT INTO policies ({POLICY_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                    );
                    let q = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(&p.id)
                        .bind(p.tenant_id.as_deref())
                        .bind(p.resource_type.as_str())
                        .bind(p.effect.as_str())
                        .bind(&p.pattern)
                        .bind(p.priority)
                        .bind(p.created_at)
                        .bind(p.updated_at);
                    exec_one(conn, q, "policy", &p.id).await
                }
                Mutation::DeletePolicy { id } => {
                    let q = sqlx::query("DELETE FROM policies WHERE id = $1").bind(id);
                    exec_one(conn, q, "policy", id).await
                }
                Mutation::PutQuota(qt) => {
                    let sql = format!(
                        "INSERT INTO owner_quotas ({QUOTA_COLS}) VALUES ($1, $2, $3, $4, $5, $6) \
                         ON CONFLICT (owner_id) DO UPDATE SET max_sandboxes = excluded.max_sandboxes, \
                         max_ttl_seconds = excluded.max_ttl_seconds, \
                         max_exec_timeout_seconds = excluded.max_exec_timeout_seconds, \
                         updated_at = excluded.updated_at"
                    );
                    let q = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(&qt.owner_id)
                        .bind(qt.max_sandboxes)
                        .bind(qt.max_ttl_seconds)
                        .bind(qt.max_exec_timeout_seconds)
                        .bind(qt.created_at)
                        .bind(qt.updated_at);
                    exec_one(conn, q, "owner quota", &qt.owner_id).await
                }
                Mutation::DeleteQuota { owner_id } => {
                    let q = sqlx::query("DELETE FROM owner_quotas WHERE owner_id = $1").bind(owner_id);
                    exec_one(conn, q, "owner quota", owner_id).await
                }
                Mutation::CreateTemplate(t) => {
                    let sql = format!(
                        "INSERT INTO templates ({TEMPLATE_COLS}) VALUES \
                         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
                    );
                    let q = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(&t.name)
                        .bind(t.version)
                        .bind(&t.image)
                        .bind(&t.description)
                        .bind(&t.runtime)
                        .bind(to_json(&t.setup))
                        .bind(to_json(&t.allowed_hosts))
                        .bind(to_json(&t.env))
                        .bind(t.memory_mb)
                        .bind(t.vcpus)
                        .bind(t.ttl_seconds)
                        .bind(t.created_at)
                        .bind(t.updated_at);
                    exec_one(conn, q, "template", &t.name).await
                }
                Mutation::UpdateTemplate(t) => {
                    let q = sqlx::query(
                        "UPDATE templates SET version = $2, image = $3, description = $4, runtime = $5, \
                         setup = $6, allowed_hosts = $7, env = $8, memory_mb = $9, vcpus = $10, \
                         ttl_seconds = $11, updated_at = $12 WHERE name = $1",
                    )
                    .bind(&t.name)
                    .bind(t.version)
                    .bind(&t.image)
                    .bind(&t.description)
                    .bind(&t.runtime)
                    .bind(to_json(&t.setup))
                    .bind(to_json(&t.allowed_hosts))
                    .bind(to_json(&t.env))
                    .bind(t.memory_mb)
                    .bind(t.vcpus)
                    .bind(t.ttl_seconds)
                    .bind(t.updated_at);
                    exec_one(conn, q, "template", &t.name).await
                }
                Mutation::DeleteTemplate { name } => {
                    let q = sqlx::query("DELETE FROM templates WHERE name = $1").bind(name);
                    exec_one(conn, q, "template", name).await
                }
                Mutation::AppendAdminAudit(a) => {
                    let q = sqlx::query(
                        "INSERT INTO admin_audit (id, actor, method, path, status, duration_ms, request_id, \
                         remote_addr, user_agent, tenant_id, created_at) \
                         VALUES (COALESCE(NULLIF($11, 0), (SELECT COALESCE(MAX(id), 0) + 1 FROM admin_audit)), \
                         $1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
                    )
                    .bind(&a.actor)
                    .bind(&a.method)
                    .bind(&a.path)
                    .bind(a.status)
                    .bind(a.duration_ms)
                    .bind(&a.request_id)
                    .bind(&a.remote_addr)
                    .bind(&a.user_agent)
                    .bind(&a.tenant_id)
                    .bind(a.created_at)
                    .bind(a.id);
                    insert_returning_id(conn, q, "admin audit", &a.request_id).await
                }
                Mutation::DeleteAdminAuditBefore { before } => {
                    let q = sqlx::query("DELETE FROM admin_audit WHERE created_at < $1").bind(*before);
                    exec_count(conn, q, "admin audit").await
                }
                Mutation::AppendOperationAudit(a) => {
                    let q = sqlx::query(
                        "INSERT INTO operation_audit (id, actor, action, sandbox_id, resource, runtime, \
                         status, detail, tenant_id, created_at) \
                         VALUES (COALESCE(NULLIF($10, 0), (SELECT COALESCE(MAX(id), 0) + 1 FROM operation_audit)), \
                         $1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                    )
                    .bind(&a.actor)
                    .bind(&a.action)
                    .bind(&a.sandbox_id)
                    .bind(&a.resource)
                    .bind(&a.runtime)
                    .bind(a.status.as_str())
                    .bind(&a.detail)
                    .bind(&a.tenant_id)
                    .bind(a.created_at)
                    .bind(a.id);
                    insert_returning_id(conn, q, "operation audit", &a.action).await
                }
                Mutation::DeleteOperationAuditBefore { before } => {
                    let q = sqlx::query("DELETE FROM operation_audit WHERE created_at < $1").bind(*before);
                    exec_count(conn, q, "operation audit").await
                }
                Mutation::RevokeToken(r) => {
                    let sql = format!(
                        "INSERT INTO revoked_worker_tokens ({REVOKED_COLS}) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (jti) DO NOTHING"
                    );
                    let q = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(&r.jti)
                        .bind(&r.reason)
                        .bind(r.revoked_at)
                        .bind(r.expires_at);
                    exec_count(conn, q, "revoked token").await.map(|_| MutationOutput::Done)
                }
                Mutation::PruneRevokedTokens { now } => {
                    let q = sqlx::query("DELETE FROM revoked_worker_tokens WHERE expires_at <= $1").bind(*now);
                    exec_count(conn, q, "revoked token").await
                }
                Mutation::SetMembership { membership } => {
                    let q = sqlx::query("UPDATE raft_state SET membership = $1 WHERE id = 1").bind(membership);
                    exec_one(conn, q, "raft state", "1").await
                }
                Mutation::RecordRemovedNode { node_id, at } => {
                    let q = sqlx::query(
                        "INSERT INTO removed_nodes (node_id, removed_at) VALUES ($1, $2) \
                         ON CONFLICT (node_id) DO NOTHING",
                    )
                    .bind(*node_id)
                    .bind(*at);
                    exec_count(conn, q, "removed node").await.map(|_| MutationOutput::Done)
                }
                Mutation::RecordIncarnation { node_id, incarnation, boot_id, at } => {
                    let q = sqlx::query(
                        "SELECT incarnation, boot_id FROM replica_incarnations WHERE node_id = $1",
                    )
                    .bind(*node_id);
                    let row = q
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(|e| StoreError::from_sqlx(e, "incarnation", ""))?;
                    if let Some(r) = row {
                        let have: i64 = r.try_get(0).map_err(|e| StoreError::from_sqlx(e, "incarnation", ""))?;
                        let have_boot: String = r.try_get(1).map_err(|e| StoreError::from_sqlx(e, "incarnation", ""))?;
                        if *incarnation < have || (*incarnation == have && *boot_id != have_boot) {
                            return Err(StoreError::conflict(
                                "incarnation",
                                &node_id.to_string(),
                                format!("stale incarnation: {incarnation} is not above {have}, the newest recorded start of replica {node_id}"),
                            ));
                        }
                    }
                    let q = sqlx::query(
                        "INSERT INTO replica_incarnations (node_id, incarnation, boot_id, updated_at) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (node_id) DO UPDATE SET \
                         incarnation = excluded.incarnation, boot_id = excluded.boot_id, \
                         updated_at = excluded.updated_at",
                    )
                    .bind(*node_id)
                    .bind(*incarnation)
                    .bind(boot_id)
                    .bind(*at);
                    exec_count(conn, q, "incarnation").await.map(|_| MutationOutput::Done)
                }
                Mutation::CreateEnrollment(e) => {
                    let sql = format!(
                        "INSERT INTO worker_enrollments ({ENROLLMENT_COLS}) VALUES ($1, $2, $3, $4, $5)"
                    );
                    let q = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(&e.token_hash)
                        .bind(&e.worker_id)
                        .bind(e.created_at)
                        .bind(e.expires_at)
                        .bind(e.used_at);
                    exec_one(conn, q, "enrollment", &hash_label(&e.token_hash)).await
                }
                Mutation::ConsumeEnrollment { token_hash, worker_id, credential_hash, now } => {
                    consume_enrollment(conn, token_hash, worker_id, credential_hash, *now).await
                }
                Mutation::DeleteWorkerCredential { worker_id } => {
                    let q = sqlx::query("DELETE FROM worker_credentials WHERE worker_id = $1").bind(worker_id);
                    exec_one(conn, q, "worker credential", worker_id).await
                }
                Mutation::PruneEnrollments { before } => {
                    let q = sqlx::query("DELETE FROM worker_enrollments WHERE expires_at < $1").bind(*before);
                    exec_count(conn, q, "enrollment").await
                }
                Mutation::Atomic(all) => {
                    let mut outs = Vec::with_capacity(all.len());
                    for inner in all {
                        // A failure propagates; the enclosing savepoint undoes
                        // the members that already ran.
                        outs.push(apply_guarded(conn, inner, depth + 1).await?);
                    }
                    Ok(MutationOutput::Many(outs))
                }
            }
        }


        /// Applies the pending migrations on one connection (see `migrate.rs`).
        /// Returns the versions this call applied.
        pub(crate) async fn run_migrations(
            conn: &mut $conn,
            migrations: &'static [$crate::migrate::Migration],
            bookkeeping_ddl: &'static str,
        ) -> Result<Vec<i64>, $crate::migrate::MigrateError> {
            use $crate::migrate::{plan, AppliedMigration, MigrateError};
            let unavailable = |e: sqlx::Error| MigrateError::Unavailable($crate::error::describe_transport(&e));
            sqlx::raw_sql(bookkeeping_ddl).execute(&mut *conn).await.map_err(unavailable)?;
            let rows = sqlx::query("SELECT version, checksum FROM schema_migrations ORDER BY version")
                .fetch_all(&mut *conn)
                .await
                .map_err(unavailable)?;
            let applied = rows
                .iter()
                .map(|r| Ok(AppliedMigration { version: r.try_get(0)?, checksum: r.try_get(1)? }))
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(unavailable)?;
            let mut done = Vec::new();
            for m in plan(migrations, &applied)? {
                let failed = |e: sqlx::Error| MigrateError::Failed {
                    version: m.version,
                    name: m.name.to_owned(),
                    reason: $crate::error::describe_transport(&e),
                };
                let mut tx = sqlx::Connection::begin_with(&mut *conn, $begin).await.map_err(unavailable)?;
                // Another process may have applied it since we planned.
                let already = sqlx::query("SELECT checksum FROM schema_migrations WHERE version = $1")
                    .bind(m.version)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(unavailable)?;
                if let Some(row) = already {
                    let sum: String = row.try_get(0).map_err(unavailable)?;
                    if sum != m.checksum() {
                        return Err(MigrateError::ChecksumMismatch { version: m.version, name: m.name.to_owned() });
                    }
                    continue;
                }
                sqlx::raw_sql(m.sql).execute(&mut *tx).await.map_err(failed)?;
                sqlx::query("INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES ($1, $2, $3, $4)")
                    .bind(m.version)
                    .bind(m.name)
                    .bind(m.checksum())
                    .bind(Ts::now())
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
                tx.commit().await.map_err(failed)?;
                done.push(m.version);
            }
            Ok(done)
        }

        /// Every row of `table` (ordered by `order`), mapped with `f`.
        async fn dump<T>(
            conn: &mut $conn,
            cols: &str,
            table: &str,
            order: &str,
            f: fn(&DbRow) -> Result<T, sqlx::Error>,
        ) -> Result<Vec<T>, StoreError> {
            let sql = format!("SELECT {cols} FROM {table} ORDER BY {order}");
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| StoreError::from_sqlx(e, table, ""))?;
            map_rows(rows, f, table)
        }

        fn raft_row(r: &DbRow) -> Result<RaftState, sqlx::Error> {
            let idx: i64 = r.try_get("applied_index")?;
            Ok(RaftState {
                applied_index: u64::try_from(idx).unwrap_or_default(),
                applied_log: r.try_get("applied_log")?,
                membership: r.try_get("membership")?,
            })
        }

        fn generation_row(r: &DbRow) -> Result<(String, i64), sqlx::Error> {
            Ok((r.try_get(0)?, r.try_get(1)?))
        }

        fn removed_row(r: &DbRow) -> Result<(i64, Ts), sqlx::Error> {
            Ok((r.try_get(0)?, r.try_get(1)?))
        }

        fn incarnation_row(r: &DbRow) -> Result<(i64, i64, String, Ts), sqlx::Error> {
            Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?))
        }

        async fn export_all(conn: &mut $conn) -> Result<StoreSnapshot, StoreError> {
            let raft = dump(conn, "applied_index, applied_log, membership", "raft_state", "id", raft_row)
                .await?
                .pop()
                .ok_or_else(|| StoreError::not_found("raft state", "1"))?;
            Ok(StoreSnapshot {
                raft,
                sandboxes: dump(conn, SANDBOX_COLS, "sandboxes", "id", sandbox_row).await?,
                exec_logs: dump(conn, EXEC_LOG_COLS, "exec_logs", "id", exec_log_row).await?,
                workers: dump(conn, WORKER_COLS, "workers", "id", worker_row).await?,
                leases: dump(conn, LEASE_COLS, "leases", "resource_id", lease_row).await?,
                lease_generations: dump(
                    conn,
                    "resource_id, last_generation",
                    "lease_generations",
                    "resource_id",
                    generation_row,
                )
                .await?,
                tenants: dump(conn, TENANT_COLS, "tenants", "id", tenant_row).await?,
                members: dump(conn, MEMBER_COLS, "tenant_members", "tenant_id, user_id", member_row).await?,
                policies: dump(conn, POLICY_COLS, "policies", "id", policy_row).await?,
                quotas: dump(conn, QUOTA_COLS, "owner_quotas", "owner_id", quota_row).await?,
                templates: dump(conn, TEMPLATE_COLS, "templates", "name", template_row).await?,
                admin_audit: dump(conn, ADMIN_AUDIT_COLS, "admin_audit", "id", admin_audit_row).await?,
                operation_audit: dump(conn, OP_AUDIT_COLS, "operation_audit", "id", op_audit_row).await?,
                revoked_tokens: dump(conn, REVOKED_COLS, "revoked_worker_tokens", "jti", revoked_row).await?,
                removed_nodes: dump(conn, "node_id, removed_at", "removed_nodes", "node_id", removed_row).await?,
                enrollments: dump(conn, ENROLLMENT_COLS, "worker_enrollments", "token_hash", enrollment_row).await?,
                worker_credentials: dump(conn, CREDENTIAL_COLS, "worker_credentials", "worker_id", credential_row)
                    .await?,
                incarnations: dump(
                    conn,
                    "node_id, incarnation, boot_id, updated_at",
                    "replica_incarnations",
                    "node_id",
                    incarnation_row,
                )
                .await?,
            })
        }

        async fn replace_all(conn: &mut $conn, snap: &StoreSnapshot) -> Result<(), StoreError> {
            // Children before parents, so foreign keys hold at every step.
            for table in [
                "exec_logs", "tenant_members", "policies", "sandboxes", "tenants", "leases",
                "lease_generations", "workers", "owner_quotas", "templates", "admin_audit",
                "operation_audit", "revoked_worker_tokens", "removed_nodes", "worker_enrollments",
                "worker_credentials", "replica_incarnations",
            ] {
                sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table}")))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, table, ""))?;
            }
            // Parents before children. Rows keep their IDs (non-zero IDs are kept).
            let mut all: Vec<Mutation> = Vec::new();
            all.extend(snap.sandboxes.iter().cloned().map(Mutation::CreateSandbox));
            all.extend(snap.exec_logs.iter().cloned().map(Mutation::AppendExecLog));
            all.extend(snap.workers.iter().cloned().map(Mutation::PutWorker));
            all.extend(snap.tenants.iter().cloned().map(Mutation::CreateTenant));
            all.extend(snap.members.iter().cloned().map(Mutation::PutMember));
            all.extend(snap.policies.iter().cloned().map(Mutation::CreatePolicy));
            all.extend(snap.quotas.iter().cloned().map(Mutation::PutQuota));
            all.extend(snap.templates.iter().cloned().map(Mutation::CreateTemplate));
            all.extend(snap.admin_audit.iter().cloned().map(Mutation::AppendAdminAudit));
            all.extend(snap.operation_audit.iter().cloned().map(Mutation::AppendOperationAudit));
            all.extend(snap.revoked_tokens.iter().cloned().map(Mutation::RevokeToken));
            all.extend(snap.removed_nodes.iter().map(|(node_id, at)| Mutation::RecordRemovedNode { node_id: *node_id, at: *at }));
            all.extend(snap.incarnations.iter().map(|(node_id, incarnation, boot_id, at)| Mutation::RecordIncarnation {
                node_id: *node_id,
                incarnation: *incarnation,
                boot_id: boot_id.clone(),
                at: *at,
            }));
            // Used enrollments keep their `used_at`: CreateEnrollment stores it as given.
            all.extend(snap.enrollments.iter().cloned().map(Mutation::CreateEnrollment));
            for m in &all {
                m.validate()?;
                apply_one(conn, m, 0).await?;
            }
            for l in &snap.leases {
                write_lease(conn, l).await?;
            }
            for c in &snap.worker_credentials {
                c.validate()?;
                write_credential(conn, c).await?;
            }
            for (rid, generation) in &snap.lease_generations {
                sqlx::query("INSERT INTO lease_generations (resource_id, last_generation) VALUES ($1, $2)")
                    .bind(rid)
                    .bind(*generation)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "lease", rid))?;
            }
            sqlx::query("UPDATE raft_state SET applied_index = $1, applied_log = $2, membership = $3 WHERE id = 1")
                .bind(index_i64(snap.raft.applied_index)?)
                .bind(&snap.raft.applied_log)
                .bind(&snap.raft.membership)
                .execute(&mut *conn)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "raft state", "1"))?;
            Ok(())
        }

        impl $store {
            async fn begin_write(&self) -> Result<sqlx::Transaction<'static, $db>, StoreError> {
                self.pool
                    .begin_with($begin)
                    .await
                    .map_err(|e| StoreError::Unavailable($crate::error::describe_transport(&e)))
            }

            async fn fetch_all(
                &self,
                q: sqlx::query::Query<'_, $db, <$db as sqlx::Database>::Arguments>,
                entity: &str,
            ) -> Result<Vec<DbRow>, StoreError> {
                q.fetch_all(&self.pool).await.map_err(|e| StoreError::from_sqlx(e, entity, ""))
            }

            async fn fetch_one_as<T>(
                &self,
                q: sqlx::query::Query<'_, $db, <$db as sqlx::Database>::Arguments>,
                f: fn(&DbRow) -> Result<T, sqlx::Error>,
                entity: &str,
                id: &str,
            ) -> Result<T, StoreError> {
                let row = q
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, entity, id))?
                    .ok_or_else(|| StoreError::not_found(entity, id))?;
                f(&row).map_err(|e| StoreError::from_sqlx(e, entity, id))
            }
        }

        #[async_trait]
        impl Store for $store {
            fn driver(&self) -> $crate::StoreDriver {
                Self::DRIVER
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1")
                    .execute(&self.pool)
                    .await
                    .map(|_| ())
                    .map_err(|e| StoreError::Unavailable($crate::error::describe_transport(&e)))
            }

            async fn close(&self) {
                self.pool.close().await;
            }

            async fn execute(&self, m: &Mutation) -> Result<MutationOutput, StoreError> {
                let mut tx = self.begin_write().await?;
                let out = apply_guarded(&mut tx, m, 0).await;
                match &out {
                    Err(e) if !e.is_deterministic() => return out,
                    _ => {}
                }
                tx.commit()
                    .await
                    .map_err(|e| StoreError::Unavailable($crate::error::describe_transport(&e)))?;
                out
            }

            async fn apply_batch(
                &self,
                at: &AppliedLog,
                mutations: &[Mutation],
            ) -> Result<BatchOutcome, StoreError> {
                let mut outs = self.apply_entries(&[(at.clone(), mutations.to_vec())]).await?;
                outs.pop().ok_or_else(|| StoreError::Unavailable("no outcome for the entry".into()))
            }

            async fn apply_entries(
                &self,
                entries: &[(AppliedLog, Vec<Mutation>)],
            ) -> Result<Vec<BatchOutcome>, StoreError> {
                let mut tx = self.begin_write().await?;
                // Read the applied index under the write lock (Postgres: the row
                // lock; SQLite: BEGIN IMMEDIATE already holds the writer lock),
                // so exactly one of several appliers sharing a database sees
                // an entry as new.
                let sql = format!("SELECT applied_index FROM raft_state WHERE id = 1{}", $lock);
                let mut stored: i64 = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .fetch_one(&mut *tx)
                    .await
                    .and_then(|r| r.try_get(0))
                    .map_err(|e| StoreError::from_sqlx(e, "raft state", "1"))?;
                let mut last: Option<&AppliedLog> = None;
                let mut outcomes = Vec::with_capacity(entries.len());
                for (at, mutations) in entries {
                    let index = index_i64(at.index)?;
                    // Indexes only move forward. Raft hands entries over in
                    // order; the store does not demand contiguity because a
                    // snapshot install or openraft's storage suite may move it ahead.
                    if stored >= index {
                        outcomes.push(BatchOutcome::Skipped { applied_index: u64::try_from(stored).unwrap_or_default() });
                        continue;
                    }
                    let mut outs = Vec::with_capacity(mutations.len());
                    for m in mutations {
                        let out = apply_guarded(&mut tx, m, 0).await;
                        if let Err(e) = &out
                            && !e.is_deterministic()
                        {
                            return Err(e.clone());
                        }
                        outs.push(out);
                    }
                    outcomes.push(BatchOutcome::Applied(outs));
                    stored = index;
                    last = Some(at);
                }
                let Some(at) = last else {
                    // Nothing new: nothing to commit.
                    return Ok(outcomes);
                };
                sqlx::query("UPDATE raft_state SET applied_index = $1, applied_log = $2 WHERE id = 1")
                    .bind(stored)
                    .bind(&at.log_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "raft state", "1"))?;
                tx.commit()
                    .await
                    .map_err(|e| StoreError::Unavailable($crate::error::describe_transport(&e)))?;
                Ok(outcomes)
            }

            async fn export_snapshot(&self) -> Result<StoreSnapshot, StoreError> {
                let mut tx = self
                    .pool
                    .begin_with($begin_read)
                    .await
                    .map_err(|e| StoreError::Unavailable($crate::error::describe_transport(&e)))?;
                // Read-only: dropping the transaction afterwards rolls it back.
                export_all(&mut tx).await
            }

            async fn install_snapshot(&self, snap: &StoreSnapshot) -> Result<(), StoreError> {
                let mut tx = self.begin_write().await?;
                replace_all(&mut tx, snap).await?;
                tx.commit()
                    .await
                    .map_err(|e| StoreError::Unavailable($crate::error::describe_transport(&e)))
            }

            async fn raft_state(&self) -> Result<RaftState, StoreError> {
                let q = sqlx::query("SELECT applied_index, applied_log, membership FROM raft_state WHERE id = 1");
                self.fetch_one_as(
                    q,
                    |r| {
                        let idx: i64 = r.try_get("applied_index")?;
                        Ok(RaftState {
                            applied_index: u64::try_from(idx).unwrap_or_default(),
                            applied_log: r.try_get("applied_log")?,
                            membership: r.try_get("membership")?,
                        })
                    },
                    "raft state",
                    "1",
                )
                .await
            }

            async fn get_sandbox(&self, id: &str) -> Result<Sandbox, StoreError> {
                let sql = format!("SELECT {SANDBOX_COLS} FROM sandboxes WHERE id = $1");
                self.fetch_one_as(sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id), sandbox_row, "sandbox", id).await
            }

            async fn list_sandboxes(&self, f: &SandboxFilter) -> Result<Vec<Sandbox>, StoreError> {
                let sql = format!(
                    "SELECT {SANDBOX_COLS} FROM sandboxes WHERE state <> 'destroyed' \
                     AND ($1 IS NULL OR owner_id = $1) AND ($2 IS NULL OR tenant_id = $2) \
                     AND ($3 IS NULL OR worker_id = $3) AND ($4 IS NULL OR state = $4) \
                     ORDER BY created_at DESC, id DESC LIMIT $5 OFFSET $6"
                );
                let q = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(f.owner_id.as_deref())
                    .bind(f.tenant_id.as_deref())
                    .bind(f.worker_id.as_deref())
                    .bind(f.state.map(|s| s.as_str()))
                    .bind(clamp_limit(f.limit, 100, 1000))
                    .bind(f.offset.unwrap_or(0).max(0));
                map_rows(self.fetch_all(q, "sandbox").await?, sandbox_row, "sandbox")
            }

            async fn list_expired_sandboxes(&self, before: Ts) -> Result<Vec<Sandbox>, StoreError> {
                let sql = format!(
                    "SELECT {SANDBOX_COLS} FROM sandboxes WHERE state <> 'destroyed' \
                     AND expires_at < $1 ORDER BY expires_at, id"
                );
                let q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(before);
                map_rows(self.fetch_all(q, "sandbox").await?, sandbox_row, "sandbox")
            }

            async fn count_active_sandboxes(&self, owner_id: Option<&str>) -> Result<i64, StoreError> {
                let q = sqlx::query(
                    "SELECT COUNT(*) FROM sandboxes WHERE state <> 'destroyed' \
                     AND ($1 IS NULL OR owner_id = $1)",
                )
                .bind(owner_id);
                let rows = self.fetch_all(q, "sandbox").await?;
                rows.first()
                    .map(|r| r.try_get::<i64, _>(0))
                    .transpose()
                    .map(Option::unwrap_or_default)
                    .map_err(|e| StoreError::from_sqlx(e, "sandbox", ""))
            }

            async fn list_exec_logs(&self, sandbox_id: &str, limit: Option<i64>) -> Result<Vec<ExecLog>, StoreError> {
                let sql = format!(
                    "SELECT {EXEC_LOG_COLS} FROM exec_logs WHERE sandbox_id = $1 ORDER BY id DESC LIMIT $2"
                );
                let q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(sandbox_id).bind(clamp_limit(limit, 100, 1000));
                map_rows(self.fetch_all(q, "exec log").await?, exec_log_row, "exec log")
            }

            async fn get_worker(&self, id: &str) -> Result<Worker, StoreError> {
                let sql = format!("SELECT {WORKER_COLS} FROM workers WHERE id = $1");
                self.fetch_one_as(sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id), worker_row, "worker", id).await
            }

            async fn list_workers(&self) -> Result<Vec<Worker>, StoreError> {
                let sql = format!("SELECT {WORKER_COLS} FROM workers ORDER BY id");
                map_rows(self.fetch_all(sqlx::query(sqlx::AssertSqlSafe(sql)), "worker").await?, worker_row, "worker")
            }

            async fn get_lease(&self, resource_id: &str) -> Result<Lease, StoreError> {
                let sql = format!("SELECT {LEASE_COLS} FROM leases WHERE resource_id = $1");
                self.fetch_one_as(sqlx::query(sqlx::AssertSqlSafe(sql)).bind(resource_id), lease_row, "lease", resource_id).await
            }

            async fn list_leases(&self, holder_id: Option<&str>) -> Result<Vec<Lease>, StoreError> {
                let sql = format!(
                    "SELECT {LEASE_COLS} FROM leases WHERE ($1 IS NULL OR holder_id = $1) ORDER BY resource_id"
                );
                let q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(holder_id);
                map_rows(self.fetch_all(q, "lease").await?, lease_row, "lease")
            }

            async fn lease_generation(&self, resource_id: &str) -> Result<i64, StoreError> {
                let q = sqlx::query("SELECT last_generation FROM lease_generations WHERE resource_id = $1")
                    .bind(resource_id);
                let rows = self.fetch_all(q, "lease").await?;
                rows.first()
                    .map(|r| r.try_get::<i64, _>(0))
                    .transpose()
                    .map(Option::unwrap_or_default)
                    .map_err(|e| StoreError::from_sqlx(e, "lease", resource_id))
            }

            async fn get_tenant(&self, id: &str) -> Result<Tenant, StoreError> {
                let sql = format!("SELECT {TENANT_COLS} FROM tenants WHERE id = $1");
                self.fetch_one_as(sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id), tenant_row, "tenant", id).await
            }

            async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
                let sql = format!("SELECT {TENANT_COLS} FROM tenants ORDER BY created_at DESC, id");
                map_rows(self.fetch_all(sqlx::query(sqlx::AssertSqlSafe(sql)), "tenant").await?, tenant_row, "tenant")
            }

            async fn get_member(&self, tenant_id: &str, user_id: &str) -> Result<TenantMember, StoreError> {
                let sql = format!("SELECT {MEMBER_COLS} FROM tenant_members WHERE tenant_id = $1 AND user_id = $2");
                let q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(user_id);
                self.fetch_one_as(q, member_row, "tenant member", user_id).await
            }

            async fn list_members(&self, tenant_id: &str) -> Result<Vec<TenantMember>, StoreError> {
                let sql = format!("SELECT {MEMBER_COLS} FROM tenant_members WHERE tenant_id = $1 ORDER BY user_id");
                let q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(tenant_id);
                map_rows(self.fetch_all(q, "tenant member").await?, member_row, "tenant member")
            }

            async fn get_policy(&self, id: &str) -> Result<Policy, StoreError> {
                let sql = format!("SELECT {POLICY_COLS} FROM policies WHERE id = $1");
                self.fetch_one_as(sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id), policy_row, "policy", id).await
            }

            async fn list_policies(
                &self,
                tenant_id: Option<&str>,
                resource_type: Option<PolicyResource>,
            ) -> Result<Vec<Policy>, StoreError> {
                let sql = format!(
                    "SELECT {POLICY_COLS} FROM policies \
                     WHERE (tenant_id IS NULL OR tenant_id = $1) AND ($2 IS NULL OR resource_type = $2) \
                     ORDER BY priority, created_at, id"
                );
                let q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(resource_type.map(|r| r.as_str()));
                map_rows(self.fetch_all(q, "policy").await?, policy_row, "policy")
            }

            async fn get_quota(&self, owner_id: &str) -> Result<OwnerQuota, StoreError> {
                let sql = format!("SELECT {QUOTA_COLS} FROM owner_quotas WHERE owner_id = $1");
                self.fetch_one_as(sqlx::query(sqlx::AssertSqlSafe(sql)).bind(owner_id), quota_row, "owner quota", owner_id).await
            }

            async fn list_quotas(&self) -> Result<Vec<OwnerQuota>, StoreError> {
                let sql = format!("SELECT {QUOTA_COLS} FROM owner_quotas ORDER BY owner_id");
                map_rows(self.fetch_all(sqlx::query(sqlx::AssertSqlSafe(sql)), "owner quota").await?, quota_row, "owner quota")
            }

            async fn get_template(&self, name: &str) -> Result<Template, StoreError> {
                let sql = format!("SELECT {TEMPLATE_COLS} FROM templates WHERE name = $1");
                self.fetch_one_as(sqlx::query(sqlx::AssertSqlSafe(sql)).bind(name), template_row, "template", name).await
            }

            async fn list_templates(&self) -> Result<Vec<Template>, StoreError> {
                let sql = format!("SELECT {TEMPLATE_COLS} FROM templates ORDER BY name");
                map_rows(self.fetch_all(sqlx::query(sqlx::AssertSqlSafe(sql)), "template").await?, template_row, "template")
            }

            async fn list_admin_audit(&self, f: &AdminAuditFilter) -> Result<Vec<AdminAudit>, StoreError> {
                let sql = format!(
                    "SELECT {ADMIN_AUDIT_COLS} FROM admin_audit WHERE ($1 IS NULL OR actor = $1) \
                     AND ($2 IS NULL OR method = $2) AND ($3 IS NULL OR status = $3) \
                     AND ($4 IS NULL OR substr(path, 1, length(CAST($4 AS TEXT))) = CAST($4 AS TEXT)) \
                     AND ($5 IS NULL OR tenant_id = $5) AND ($6 IS NULL OR created_at >= $6) \
                     ORDER BY created_at DESC, id DESC LIMIT $7"
                );
                let q = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(f.actor.as_deref())
                    .bind(f.method.as_deref())
                    .bind(f.status)
                    .bind(f.path_prefix.as_deref())
                    .bind(f.tenant_id.as_deref())
                    .bind(f.since)
                    .bind(clamp_limit(f.limit, 100, 500));
                map_rows(self.fetch_all(q, "admin audit").await?, admin_audit_row, "admin audit")
            }

            async fn list_operation_audit(&self, f: &OperationAuditFilter) -> Result<Vec<OperationAudit>, StoreError> {
                let sql = format!(
                    "SELECT {OP_AUDIT_COLS} FROM operation_audit WHERE ($1 IS NULL OR actor = $1) \
                     AND ($2 IS NULL OR action = $2) AND ($3 IS NULL OR sandbox_id = $3) \
                     AND ($4 IS NULL OR status = $4) AND ($5 IS NULL OR tenant_id = $5) \
                     AND ($6 IS NULL OR created_at >= $6) \
                     ORDER BY created_at DESC, id DESC LIMIT $7"
                );
                let q = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(f.actor.as_deref())
                    .bind(f.action.as_deref())
                    .bind(f.sandbox_id.as_deref())
                    .bind(f.status.map(|s| s.as_str()))
                    .bind(f.tenant_id.as_deref())
                    .bind(f.since)
                    .bind(clamp_limit(f.limit, 100, 500));
                map_rows(self.fetch_all(q, "operation audit").await?, op_audit_row, "operation audit")
            }

            async fn is_token_revoked(&self, jti: &str) -> Result<bool, StoreError> {
                let q = sqlx::query("SELECT 1 FROM revoked_worker_tokens WHERE jti = $1").bind(jti);
                Ok(!self.fetch_all(q, "revoked token").await?.is_empty())
            }

            async fn is_node_removed(&self, node_id: i64) -> Result<bool, StoreError> {
                let q = sqlx::query("SELECT 1 FROM removed_nodes WHERE node_id = $1").bind(node_id);
                Ok(!self.fetch_all(q, "removed node").await?.is_empty())
            }

            async fn get_enrollment(&self, token_hash: &str) -> Result<Enrollment, StoreError> {
                let sql = format!("SELECT {ENROLLMENT_COLS} FROM worker_enrollments WHERE token_hash = $1");
                let q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(token_hash);
                self.fetch_one_as(q, enrollment_row, "enrollment", &hash_label(token_hash)).await
            }

            async fn get_worker_credential(&self, worker_id: &str) -> Result<WorkerCredential, StoreError> {
                let sql = format!("SELECT {CREDENTIAL_COLS} FROM worker_credentials WHERE worker_id = $1");
                let q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(worker_id);
                self.fetch_one_as(q, credential_row, "worker credential", worker_id).await
            }

            async fn list_revoked_tokens(&self) -> Result<Vec<RevokedToken>, StoreError> {
                let sql = format!("SELECT {REVOKED_COLS} FROM revoked_worker_tokens ORDER BY revoked_at, jti");
                map_rows(self.fetch_all(sqlx::query(sqlx::AssertSqlSafe(sql)), "revoked token").await?, revoked_row, "revoked token")
            }
        }
    };
}

pub(crate) use sql_store;
