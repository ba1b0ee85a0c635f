-- Rate limits shared by every provisioning-core instance (issue 13): wrong secrets per (source, key)
-- and per source, provisions per profile and per source. One row per bucket, GCRA ("generic cell rate
-- algorithm", a token bucket stored as one number): `tat` is the bucket's theoretical arrival time in
-- Unix seconds; a bucket of `capacity` tokens refilled over `period` seconds has room for one more
-- when greatest(tat, now) + period / capacity <= now + period. A row whose tat is in the past is a
-- full bucket, the same as no row (purged by provisioning-core).
--
-- UNLOGGED: no WAL for a row written on every provision; after a crash of Postgres (or a fail-over
-- to a replica) the limits simply start again from full buckets.
CREATE UNLOGGED TABLE rate_limit_buckets (
    bucket text PRIMARY KEY,
    tat    double precision NOT NULL
);

-- One call per provision request. Every bucket named must have room; the ones with p_take = true
-- are then all taken (one token each), atomically, or none is. Rows to take are locked in name order
-- (no deadlocks between instances). Returns refused = 0 (admitted), 1 (a bucket with p_take = false
-- is empty), 2 (a bucket with p_take = true is empty), with retry_after = seconds until the
-- refusing buckets have room again. The clock is the database's: one clock for every instance.
CREATE FUNCTION rate_limit_admit(
    p_buckets  text[],
    p_emission double precision[],
    p_period   double precision[],
    p_take     boolean[],
    OUT refused integer,
    OUT retry_after double precision
)
LANGUAGE plpgsql AS $$
DECLARE
    now_s double precision := extract(epoch FROM clock_timestamp());
BEGIN
    IF true = ANY (p_take) THEN
        INSERT INTO rate_limit_buckets (bucket, tat)
        SELECT b, 0 FROM unnest(p_buckets, p_take) AS r(b, take) WHERE take ORDER BY b
        ON CONFLICT DO NOTHING;
        PERFORM 1 FROM rate_limit_buckets
        WHERE bucket = ANY (ARRAY(SELECT b FROM unnest(p_buckets, p_take) AS r(b, take) WHERE take))
        ORDER BY bucket FOR UPDATE;
    END IF;
    SELECT coalesce(min(CASE WHEN r.take THEN 2 ELSE 1 END), 0),
           coalesce(max(greatest(coalesce(k.tat, 0), now_s) + r.emission - r.period - now_s), 0)
    INTO refused, retry_after
    FROM unnest(p_buckets, p_emission, p_period, p_take) AS r(bucket, emission, period, take)
    LEFT JOIN rate_limit_buckets k ON k.bucket = r.bucket
    WHERE greatest(coalesce(k.tat, 0), now_s) + r.emission > now_s + r.period + 1e-6;
    IF refused = 0 AND true = ANY (p_take) THEN
        UPDATE rate_limit_buckets k
        SET tat = greatest(k.tat, now_s) + r.emission
        FROM unnest(p_buckets, p_emission, p_take) AS r(bucket, emission, take)
        WHERE r.take AND k.bucket = r.bucket;
    END IF;
END;
$$;
