"""`workbench compare`: one base config under several strategies, training fractions and seeds."""
