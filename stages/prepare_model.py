"""Stage prepare_model: materialise one model as a safetensors folder under store/models/<name>."""

from pipeline.config.params import load_params
from pipeline.sources.models import materialise
from stages import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    params = load_params(args.params, models=[args.model], datasets=[])
    info = materialise(params.model(args.model), params.model_dir(args.model))
    print(f"{args.model}: {info['origin']['format']}, weights sha256 {info['weights_sha256'][:16]}… "
          f"-> {params.model_dir(args.model)}")


if __name__ == "__main__":
    run_stage(main)
