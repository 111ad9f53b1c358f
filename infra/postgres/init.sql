-- One PostgreSQL server, one database per service: `mlflow` (tracking + model registry) and `prefect`
-- (orchestration). The official postgres image runs this file once, as POSTGRES_USER, when it initialises an
-- empty data directory (/docker-entrypoint-initdb.d); it does not run again on later starts. Both databases are
-- owned by POSTGRES_USER, the account MLflow and Prefect connect with. Docker Compose mounts this file;
-- infra/k8s/postgres.yaml carries an identical copy in a ConfigMap (tests/infra/test_infra.py keeps them equal).
-- Idempotent, so it can also be run by hand: psql -U "$POSTGRES_USER" -d postgres -f init.sql

SELECT 'CREATE DATABASE mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec
SELECT 'CREATE DATABASE prefect' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'prefect')\gexec

-- Prefect's server uses trigram indexes; pg_trgm is a trusted extension, created here so the migrations
-- never need extra privileges.
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
