"""FM9G data: txt → jsonl, jsonl → index, indexed reading, mixtures and the packing loader.

Public entry points (import the module you need; nothing heavy is imported here):

- `fm9g.data.txt2jsonl.txt2jsonl(source, dest)`
- `fm9g.data.tokenizer.load_tokenizer(path)`, `train_sentencepiece(...)`
- `fm9g.data.indexer.build_index(inputs, output, ...)`, `plan_shards`, `index_shard`, `merge_shards`
- `fm9g.data.reader.IndexedDataset(path)`
- `fm9g.data.mixture.load_mixture(path_or_list, base_dir)`, `needs_index(entry)`
- `fm9g.data.loader.PackedLoader(mixture, tokenizer, batch_size=..., max_length=...)`

Every data problem is a `fm9g.data.errors.DataError` whose message names the place.
"""
