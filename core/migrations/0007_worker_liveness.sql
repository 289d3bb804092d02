-- Workers' liveness (core/liveness.py): each process that claims work holds the session advisory lock
-- (LockKey.WORKER, key) while it lives, with a key drawn once from worker_keys; its claims record the key, so a claim
-- whose key is not locked any more belongs to a worker that is gone and is taken over at once.
CREATE SEQUENCE worker_keys AS integer MINVALUE 1 MAXVALUE 2147483647 CYCLE;

ALTER TABLE eval_work_items ADD COLUMN worker_key integer;

-- Submitted executions are claimed like evaluation items: the claiming worker's key, and the claims made so far
-- (one that outlived MAX_ATTEMPTS workers is recorded as failed).
ALTER TABLE executions ADD COLUMN worker_key integer, ADD COLUMN attempts integer NOT NULL DEFAULT 0;
CREATE INDEX executions_running ON executions (id) WHERE status = 'running';
