-- The rate limiter decides a batch of requests in one transaction (provisioning_core.rate_limit,
-- repository.rate_limit_batch) with the algorithm written once in Python; the per-request function
-- of 0007 is no longer called. The table stays as it is.
DROP FUNCTION IF EXISTS rate_limit_admit(text[], double precision[], double precision[], boolean[]);
