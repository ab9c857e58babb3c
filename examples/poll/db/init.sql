-- Run once by the db image when it initialises an empty data directory (docker-entrypoint-initdb.d).
-- The choices a vote may name; the schema of the votes themselves belongs to the migrate job.
CREATE TABLE choices (name TEXT PRIMARY KEY, label TEXT NOT NULL);
INSERT INTO choices (name, label) VALUES ('a', 'Apples'), ('b', 'Bananas'), ('c', 'Cherries');
GRANT SELECT ON choices TO PUBLIC;
