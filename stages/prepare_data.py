"""Stage prepare_data: read one corpus (local mirror or hub), check it, carve validation, normalise."""

from pipeline.config.params import load_params
from pipeline.sources.corpora import build_corpus, write_corpus
from stages import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--dataset", required=True)
    args = parser.parse_args()
    params = load_params(args.params, models=[], datasets=[args.dataset])
    corpus = build_corpus(params.dataset(args.dataset), params.data_mirror, params.data)
    write_corpus(corpus, params.data_dir(args.dataset))
    print(f"{args.dataset}: {corpus.meta['source']['kind']} source, rows {corpus.meta['rows']}, "
          f"{len(corpus.label_names)} labels, {len(corpus.meta['dropped'])} rows dropped")


if __name__ == "__main__":
    run_stage(main)
