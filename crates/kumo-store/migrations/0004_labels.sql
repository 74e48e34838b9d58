-- Host labels (JSON object) for placement policies: roles, spare hosts, constraints.
ALTER TABLE hosts ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
